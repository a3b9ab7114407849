"""Progress of long work: a tqdm bar in a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys


class Progress:
    """Progress of `total` steps from `start`: a tqdm bar when `stream` is a terminal, else a
    line every tenth of the way (so logs of batch jobs stay short)."""

    def __init__(self, start: int, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.every = max(1, total // 10)
        self.bar = None
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                            dynamic_ncols=True)

    def update(self, step: int, loss: float, extra: str = "") -> None:
        """Step `step` is done with this loss."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.3e}" + (f" {extra}" if extra else ""),
                                     refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  loss {loss:.4e}" + (f"  {extra}" if extra else ""),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
