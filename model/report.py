"""Plots of a training run and of its evaluation, for README and `snakemake --report report.html`.

    training.png     training loss (raw and smoothed) and validation loss over tokens; learning rate below
    throughput.png   training tokens/s over tokens
    perplexity.png   token perplexity per Pile subset, with bits per byte, the overall figure and the
                     untrained model's

The run's metrics log is `metrics.jsonl` in the run folder that final.pt names (`run_dir`, relative to
final.pt's folder): one JSON object per line, {"kind": "train", "step", "tokens", "loss", "lr", ...} per
optimizer step or per window of steps (model/run.py Metrics) and {"kind": "val", "step", "tokens",
"val_loss"} per periodic validation. If a step is logged twice (logs of older versions, which kept the first
attempt's records after a resume), the last record wins.

The report's memory and plots do not grow with the run: the log is read once, from its end, and binned into
at most BINS points per curve (the mean, least and largest value of each bin), whatever the number of steps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from pipeline.io import atomic_output, log_file, read_json  # noqa: E402

DPI = 110


def metrics_path(model_path: str | Path) -> Path:
    """metrics.jsonl of the run that wrote model_path (final.pt's `run_dir`, relative to final.pt's folder)."""
    from model.checkpoint import load_model

    model_path = Path(model_path)
    _, _, meta = load_model(model_path)
    run_dir = meta.get("run_dir")
    if not run_dir:
        raise ValueError(f"{model_path}: names no run folder (run_dir), so its metrics log cannot be found")
    path = model_path.parent / run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such metrics log (the run folder named by {model_path})")
    return path


BINS = 2000        # points per curve: a plot 8 inches wide at 110 dpi has ~900 pixels
PENDING = 8192     # records parsed before they are binned together (numpy, not a Python loop per record)
LAST = {"step", "batches", "tokens", "elapsed_s"}  # counters: a bin keeps its last record's value


class Binned:
    """Records of one kind, binned by step into at most `bins` equal step ranges; fed in decreasing step order.

    The first record fed (the run's last step) fixes the bin width. Per bin and field: the mean, the least
    and the largest value (`loss`, `loss_min`, `loss_max`), and for counters the last record's value."""

    def __init__(self, bins: int):
        self.bins, self.width = bins, 0
        self.fields: list[str] = []
        self.pending: list[list[float]] = []
        self.sums = self.mins = self.maxs = self.lasts = self.counts = None

    def add(self, rec: dict) -> None:
        if self.width == 0:
            self.width = max(1, math.ceil(int(rec["step"]) / self.bins))
            self.fields = ["step"] + sorted(k for k in rec if k not in ("kind", "step"))
            shape = (self.bins + 1, len(self.fields))
            self.sums, self.counts = np.zeros(shape), np.zeros(shape)
            self.mins, self.maxs = np.full(shape, np.inf), np.full(shape, -np.inf)
            self.lasts = np.full(shape, np.nan)
        self.pending.append([float(rec.get(f, np.nan)) for f in self.fields])
        if len(self.pending) == PENDING:
            self._bin()

    def _bin(self) -> None:
        if not self.pending:
            return
        v = np.array(self.pending)
        self.pending = []
        b = np.minimum(np.ceil(v[:, 0] / self.width).astype(np.int64), self.bins)  # step 0 is a bin of its own
        ok = ~np.isnan(v)
        np.add.at(self.sums, b, np.where(ok, v, 0.0))
        np.add.at(self.counts, b, ok)
        np.minimum.at(self.mins, b, np.where(ok, v, np.inf))
        np.maximum.at(self.maxs, b, np.where(ok, v, -np.inf))
        first = np.unique(b, return_index=True)[1]  # decreasing steps: a bin's first record is its last step
        fresh = np.isnan(self.lasts[b[first], 0])
        self.lasts[b[first][fresh]] = v[first][fresh]

    def arrays(self) -> dict[str, np.ndarray]:
        self._bin()
        if self.width == 0:
            return {}
        used = self.counts[:, 0] > 0
        out = {"records": self.counts[used, 0]}
        with np.errstate(invalid="ignore", divide="ignore"):
            for i, f in enumerate(self.fields):
                if f in LAST:
                    out[f] = self.lasts[used, i]
                else:
                    n = self.counts[used, i]
                    out[f] = np.where(n > 0, self.sums[used, i] / n, np.nan)
                    out[f + "_min"] = np.where(n > 0, self.mins[used, i], np.nan)
                    out[f + "_max"] = np.where(n > 0, self.maxs[used, i], np.nan)
        return out


def read_metrics(path: str | Path, bins: int = BINS) -> dict[str, dict[str, np.ndarray]]:
    """{'train': {field: array}, 'val': {field: array}}, binned by step (at most `bins` points each, see
    Binned), in step order; 'records' counts the records in each bin.

    Read from the end: the last record of a step wins (an earlier one with a step not below a later one's is a
    replaced attempt), and memory is the bins, not the log. A line cut short by a killed run (the last one)
    is skipped; any other bad line is an error naming it."""
    from pipeline.io import lines_backwards

    path = Path(path)
    binned = {"train": Binned(bins), "val": Binned(bins)}
    below = {"train": math.inf, "val": math.inf}  # a record counts if its step is below every later one's
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        for offset, line in lines_backwards(fh):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                if offset + len(line) == size:
                    continue  # the last line, cut short by a kill
                number = _line_number(fh, offset)
                raise ValueError(f"{path}:{number}: not a JSON object") from None
            kind = rec.get("kind")
            if kind in binned and "step" in rec and rec["step"] < below[kind]:
                below[kind] = rec["step"]
                binned[kind].add(rec)
    return {kind: b.arrays() for kind, b in binned.items()}


def _line_number(fh, offset: int) -> int:
    """1 + the newlines before `offset` (only for an error message: read in blocks, not all at once)."""
    fh.seek(0)
    count, left = 0, offset
    while left > 0:
        block = fh.read(min(left, 1 << 20))
        count += block.count(b"\n")
        left -= len(block)
    return count + 1


def smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Centred moving average over `span` points (fewer at the ends): no lag behind the raw curve."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        return y
    half = span // 2
    csum = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(y))
    return (csum[hi] - csum[lo]) / (hi - lo)


def steps_per_point(steps: np.ndarray) -> int:
    """The typical number of optimizer steps behind one point of a binned curve."""
    return int(np.median(np.diff(steps, prepend=0))) if len(steps) else 1


def _span(n: int, per_point: int = 1) -> int:
    """Points of the moving average: up to 200 of single steps, fewer of binned points (already means)."""
    return max(1, min(200, n // 20)) if per_point == 1 else max(1, n // 200)


def _save(fig, path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_training(metrics: dict, perplexity: dict | None, path) -> None:
    train, val = metrics["train"], metrics["val"]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    if "tokens" in train and len(train["tokens"]):
        x, loss = train["tokens"], train["loss"]
        per_point = steps_per_point(train["step"])
        if per_point > 1:  # the least and largest loss of each point's steps (or records), and their mean
            ax.fill_between(x, train["loss_min"], train["loss_max"], color="tab:blue", alpha=0.15, lw=0,
                            label=f"training loss: range of each point's ~{per_point:,} steps")
        ax.plot(x, loss, color="tab:blue", alpha=0.35, lw=0.8,
                label="training loss (per step)" if per_point == 1 else "training loss (mean of each point's steps)")
        span = _span(len(loss), per_point)
        ax.plot(x, smooth(loss, span), color="tab:blue", lw=1.8,
                label=f"training loss (centred moving average, {span} points)")
        ax_lr.plot(x, train["lr"], color="tab:green", lw=1.5)
    if "tokens" in val and len(val["tokens"]):
        ax.plot(val["tokens"], val["val_loss"], "o-" if len(val["tokens"]) <= 60 else "-", color="tab:orange", ms=4,
                lw=1.5,
                label="validation loss (periodic, part of the val split)")
    if perplexity is not None and "tokens" in train and len(train["tokens"]):
        f = perplexity["overall"]
        ax.plot([train["tokens"][-1]], [f["mean_loss"]], "*", color="tab:red", ms=13,
                label=f"final evaluation, whole val split: {f['mean_loss']:.3f} nats (perplexity {f['perplexity']:,.1f})")
    ax.axhline(math.log(50257), color="grey", ls=":", lw=1, label="uniform over 50,257 tokens (ln 50257 = 10.8)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("training tokens")
    ax_lr.grid(alpha=0.3)
    ax_lr.xaxis.set_major_formatter(EngFormatter())
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _save(fig, path)


def plot_throughput(metrics: dict, path) -> None:
    train = metrics["train"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if "tokens_per_s" in train and len(train["tokens_per_s"]):
        x, y = train["tokens"], train["tokens_per_s"]
        per_point = steps_per_point(train["step"])
        ax.plot(x, y, color="tab:purple", alpha=0.3, lw=0.8,
                label="per optimizer step" if per_point == 1 else f"per point (~{per_point:,} steps)")
        ax.plot(x, smooth(y, _span(len(y), per_point)), color="tab:purple", lw=1.8, label="moving average")
        med = float(np.nanmedian(y))
        ax.axhline(med, color="black", ls="--", lw=1, label=f"median {med:,.0f} tokens/s")
        if "elapsed_s" in train and len(train["elapsed_s"]):
            ax.set_title(f"Training throughput: {x[-1]:,.0f} tokens in {train['elapsed_s'][-1] / 60:,.1f} min")
        else:
            ax.set_title("Training throughput")
        ax.set_ylim(0, float(np.nanpercentile(y, 99)) * 1.15)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("tokens / s")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_perplexity(perplexity: dict, path) -> None:
    subsets = perplexity["per_subset"]
    names = sorted(subsets, key=lambda k: subsets[k]["perplexity"])
    ppl = [subsets[k]["perplexity"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.8))
    bars = ax.barh(names, ppl, color="tab:blue", alpha=0.8)
    for bar, k in zip(bars, names):
        f = subsets[k]
        ax.annotate(f"{f['perplexity']:,.1f}  ({f['bits_per_byte']:.2f} bits/byte, {f['documents']:,} docs)",
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=8, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    total = perplexity["overall"]
    ax.axvline(total["perplexity"], color="tab:red", ls="--", lw=1.2,
               label=f"overall {total['perplexity']:,.1f} ({total['bits_per_byte']:.3f} bits/byte)")
    title = "Validation token perplexity per Pile subset"
    if "untrained" in perplexity:
        title += f"\n(the untrained model: {perplexity['untrained']['overall']['perplexity']:,.0f} overall)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"perplexity = exp(mean NLL), positions from {perplexity.get('start_predicting_from_what_token', 0)} on")
    ax.set_xlim(0, max(ppl + [total["perplexity"]]) * 1.6)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def run(model_path, perplexity_json, training_png, throughput_png, perplexity_png, log=None):
    """The three plots of a run (Snakemake rule `report`)."""
    with log_file(log) as logfh:
        metrics_file = metrics_path(model_path)
        metrics = read_metrics(metrics_file)
        perplexity = read_json(perplexity_json)
        train, val = metrics["train"], metrics["val"]
        print(f"{metrics_file}: {int(train['step'][-1]) if train else 0} training steps in "
              f"{int(train['records'].sum()) if train else 0} records, {int(val['records'].sum()) if val else 0} "
              f"validations; plotted as {len(train.get('step', []))} and {len(val.get('step', []))} points",
              file=logfh)
        plot_training(metrics, perplexity, training_png)
        plot_throughput(metrics, throughput_png)
        plot_perplexity(perplexity, perplexity_png)
        for p in (training_png, throughput_png, perplexity_png):
            print(f"wrote {p}", file=logfh)


def main(argv=None) -> int:
    import argparse

    from pipeline.config import load_settings

    p = argparse.ArgumentParser(prog="python -m model.report", description="Plots of a run and its evaluation.")
    p.add_argument("--model", help="final.pt (default: [train] folder_to_save_state_dicts/final.pt)")
    p.add_argument("--ini", default="config.ini")
    p.add_argument("--out", help="folder of the plots (default: [val] results_dir/plots)")
    args = p.parse_args(argv)
    try:
        s = load_settings(args.ini)
        model = Path(args.model) if args.model else s.train.folder_to_save_state_dicts / "final.pt"
        out = Path(args.out) if args.out else s.val.results_dir / "plots"
        run(model, s.val.results_dir / "perplexity.json", out / "training.png", out / "throughput.png",
            out / "perplexity.png")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
