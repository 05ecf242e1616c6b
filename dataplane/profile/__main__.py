"""CLI: ``python -m dataplane.profile MODEL_DIR [--stages 1,2,3,4] [--batch 8] [--prompt-tokens 64]
[--output-tokens 32] [--force]``.

Measures the model's profile (see ``dataplane.profile``) unless a stored one already covers the request, saves it
with ``common.profile.save_profile`` and prints its path as the last stdout line. Progress and notices go to
stderr; a FlexPipe error exits with status 1 and one line ``error: ...``, an interrupt with status 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import FlexPipeError
from common.model.spec import ModelSpec
from common.profile import ProfileError, profile_path, save_profile
from dataplane.profile.device import device_description
from dataplane.profile.measure import measure_profile
from dataplane.profile.progress import StageCountProgress
from dataplane.profile.reuse import reusable_profile
from dataplane.profile.workload import Workload, check_stage_counts, default_stage_counts
from dataplane.transport import check_transport


def stage_counts(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (argparse type)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.profile",
        description="Measure a model's throughput (output tokens/s) and latency (TPOT, s) per pipeline stage count.",
    )
    parser.add_argument("model_dir", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument(
        "--stages", type=stage_counts, default=None, help="stage counts to measure (default: 1 up to min(4, layers))"
    )
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests measured (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens per output (default: %(default)s)")
    parser.add_argument("--transport", default="shm", help="stage transport, shm or cuda_ipc (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="measure again even when a stored profile covers this")
    return parser.parse_args(argv)


def profile_command(args: argparse.Namespace) -> Path:
    """Reuse or measure and save; returns the profile's path."""
    model_dir = args.model_dir.expanduser().resolve()
    spec = ModelSpec.from_dir(model_dir)
    workload = Workload(args.batch, args.prompt_tokens, args.output_tokens)
    workload.check(spec)
    check_transport(args.transport)
    stages = check_stage_counts(args.stages if args.stages is not None else default_stage_counts(spec), spec)
    if not args.force:
        try:
            if reusable_profile(model_dir, stages, workload, device_description(args.transport)) is not None:
                path = profile_path(model_dir)
                print(f"reusing the stored profile {path} (--force measures again)", file=sys.stderr)
                return path
        except ProfileError as exc:
            print(f"{exc}; measuring anew", file=sys.stderr)
    title = f"Profiling {model_dir.name} at {', '.join(map(str, stages))} stage(s), batch {workload.batch_size}"
    with StageCountProgress(title, len(stages)) as progress:
        profile = measure_profile(
            model_dir, stages, args.batch, args.prompt_tokens, args.output_tokens, progress, args.transport
        )
    return save_profile(profile, model_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = profile_command(args)
    except FlexPipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was saved", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
