"""A rich progress bar on stderr with one step per measured stage count, and a line per result."""

from __future__ import annotations

from common.profile import GranularityProfile


class StageCountProgress:
    """``progress(k, None)`` shows K being measured; ``progress(k, result)`` prints its numbers and advances.
    Use as a context manager: the bar shows while the block runs."""

    def __init__(self, title: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._title = title
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<20}"),
            BarColumn(bar_width=24, finished_style="green"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task("starting", total=total)

    def __enter__(self) -> StageCountProgress:
        self._progress.console.print(self._title)
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()

    def __call__(self, num_stages: int, result: GranularityProfile | None) -> None:
        label = f"{num_stages} stage{'s' if num_stages != 1 else ''}"
        if result is None:
            self._progress.update(self._task, description=f"measuring {label}")
            return
        self._progress.console.print(
            f"{label}: {result.throughput_tokens_per_s:.1f} tokens/s, TPOT {result.latency_s * 1e3:.1f} ms, "
            f"TTFT {result.ttft_s * 1e3:.1f} ms, step {result.step_s * 1e3:.1f} ms"
        )
        self._progress.advance(self._task)
