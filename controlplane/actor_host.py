"""Running one control-plane actor as its own process: ``python -m controlplane.actor_host --actor allocator``.

The controller reaches it when its configuration names the actor's endpoint
(``[controller] allocator = "ipc://..."``); nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import zmq

from common.logging import configure_logging, emit, get_logger
from common.wire import MAX_MESSAGE_BYTES
from controlplane.shell import ActorShell

STANDALONE_ACTORS = ("allocator",)


def make_actor(name: str, inventory: str | None = None):
    if name == "allocator":
        from controlplane.allocator import Allocator

        if inventory:
            from common.topology import load_inventory

            return Allocator(load_inventory(inventory))
        return Allocator()
    raise ValueError(f"actor {name!r} cannot run alone; choose one of {STANDALONE_ACTORS}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one FlexPipe actor in its own process")
    parser.add_argument("--actor", required=True, choices=STANDALONE_ACTORS)
    parser.add_argument("--endpoint", required=True, help="ipc:// or tcp:// endpoint to bind")
    parser.add_argument("--inventory", help="TOML resource inventory (allocator)")
    args = parser.parse_args(argv)
    configure_logging(args.actor)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)
    if args.endpoint.startswith("ipc://") and os.path.exists(args.endpoint[len("ipc://") :]):
        os.unlink(args.endpoint[len("ipc://") :])
    router.bind(args.endpoint)
    shell = ActorShell([make_actor(args.actor, args.inventory)], [router], name=args.actor)
    emit(get_logger(), "bus.listening", endpoint=args.endpoint, actor=args.actor)
    loop = asyncio.new_event_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shell.stop)
    try:
        loop.run_until_complete(shell.run())
    finally:
        loop.close()
        router.close(linger=0)
        context.term()


if __name__ == "__main__":
    main()
