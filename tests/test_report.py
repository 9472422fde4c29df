"""Report: the metrics log is read as the trainer writes it (resumes, a cut last line), in memory that does not
grow with the run (an 11 M-step history); three real PNG plots."""

import math
import re
import tracemalloc
from pathlib import Path

import matplotlib.image
import numpy as np
import orjson
import pytest

from model import report
from model.checkpoint import save_model
from model.evaluate import Tally, results
from model.gpt import GPT
from model.run import steps_per_record
from pipeline.config import Architecture
from pipeline.io import write_json

ROOT = Path(__file__).resolve().parents[1]
ARCH = Architecture(N=1, d_model=32, d_ff=64, h=2, d_k=16, d_v=16, positional_encoding_max_pos=64)


def write_metrics(path: Path, steps=300, resumed_at=None, cut_last_line=False):
    """A realistic log: loss falling from 10.8, warm-up then cosine lr, tokens/s with dips, val every 50 steps."""
    rng = np.random.default_rng(0)
    lines = [{"kind": "val", "step": 0, "tokens": 0, "val_loss": 10.83}]
    for step in range(1, steps + 1):
        tokens = step * 2000
        loss = 5.5 + 5.3 * math.exp(-step / 40) + rng.normal(0, 0.15)
        lr = 1e-3 * max(0.0, min(step / 30, math.cos(math.pi * (step - 30) / (2 * (steps - 30)))))
        lines.append({"kind": "train", "step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": 1.0,
                      "tokens_per_s": 9000 + rng.normal(0, 300) - (3000 if step % 50 == 1 else 0),
                      "elapsed_s": step * 0.22})
        if step % 50 == 0:
            lines.append({"kind": "val", "step": step, "tokens": tokens, "val_loss": loss + 0.2})
        if resumed_at is not None and step == resumed_at + 20:  # killed here; the run resumes at resumed_at
            lines += [{**rec, "loss": 99.0} if rec.get("kind") == "train" else rec
                      for rec in lines[-20:]]  # replayed steps (here, with a mark to see which record wins)
    text = b"".join(orjson.dumps(rec) + b"\n" for rec in lines)
    if cut_last_line:
        text += b'{"kind": "train", "step": 3'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def perplexity_doc():
    tallies = {}
    for name, (docs, tokens, nll_per_token) in {"Wikipedia (en)": (30, 6000, 5.0), "Github": (10, 3000, 3.0),
                                                "Gutenberg (PG-19)": (50, 12000, 5.5)}.items():
        t = tallies[name] = Tally()
        for _ in range(docs):
            t.add(tokens // docs, nll_per_token * tokens / docs, 4 * tokens // docs, 5 * tokens // docs)
    untrained = {k: Tally() for k in tallies}
    for k in tallies:
        untrained[k].add(100, 100 * math.log(51000), 400, 500)
    return {"start_predicting_from_what_token": 8, **results(tallies, untrained)}


def test_last_record_of_a_step_wins_and_a_cut_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, steps=120, resumed_at=60, cut_last_line=True)
    m = report.read_metrics(path)
    assert list(m["train"]["step"]) == list(range(1, 121))
    assert list(m["val"]["step"]) == [0, 50, 100]
    replayed = m["train"]["loss"][(m["train"]["step"] > 60) & (m["train"]["step"] <= 80)]
    assert (replayed == 99.0).all()  # the resumed run's records replace the first attempt's
    assert (m["train"]["loss"][m["train"]["step"] > 80] < 20).all()


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "step": 1, "tokens": 5, "loss": 3, "lr": 1}\nnot json\n{"kind": "val"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        report.read_metrics(path)


def test_smooth_is_a_centred_moving_average():
    assert np.allclose(report.smooth(np.full(10, 3.0), 5), 3.0)  # no pull towards 0 at the ends
    y = report.smooth(np.r_[np.zeros(50), np.ones(50)], 5)
    assert y[0] == 0 and y[-1] == 1 and y[47] == 0 and y[52] == 1 and (np.diff(y) >= 0).all()
    assert y[49] == pytest.approx(0.4) and y[50] == pytest.approx(0.6)  # centred: no lag


def image(path):
    img = matplotlib.image.imread(path)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return img


def test_report_draws_three_plots_of_the_run(tmp_path):
    save_model(tmp_path / "checkpoints" / "final.pt", GPT(ARCH), ARCH, run_dir="run-abc", step=300)
    write_metrics(tmp_path / "checkpoints" / "run-abc" / "metrics.jsonl", resumed_at=100)
    write_json(tmp_path / "results" / "perplexity.json", perplexity_doc())
    plots = [tmp_path / "results" / "plots" / f"{n}.png" for n in ("training", "throughput", "perplexity")]
    report.run(tmp_path / "checkpoints" / "final.pt", tmp_path / "results" / "perplexity.json", *plots,
               log=tmp_path / "report.log")
    for p in plots:
        img = image(p)
        h, w = img.shape[:2]
        assert w > 600 and h > 250
        assert img[..., :3].std() > 0.05  # something is drawn
    assert "300 training steps in 300 records, 7 validations" in (tmp_path / "report.log").read_text()
    assert not list((tmp_path / "results" / "plots").glob(".*tmp*"))  # written atomically


def test_a_missing_metrics_log_is_an_error_naming_it(tmp_path):
    save_model(tmp_path / "final.pt", GPT(ARCH), ARCH, run_dir="run-gone")
    with pytest.raises(ValueError, match=r"run-gone/metrics.jsonl: no such metrics log"):
        report.metrics_path(tmp_path / "final.pt")


def test_every_caption_the_snakefile_names_exists():
    captions = re.findall(r'caption="([^"]+)"', (ROOT / "Snakefile").read_text())
    assert len(captions) == 3
    for c in captions:
        text = (ROOT / c).read_text()
        assert len(text.split()) > 20, c


def test_records_are_binned_by_step_with_mean_least_and_largest(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"kind": "train", "step": s, "tokens": 10 * s, "loss": float(s % 10),
                                            "lr": s / 100}) + b"\n" for s in range(1, 101)))
    m = report.read_metrics(path, bins=10)["train"]
    assert m["step"].tolist() == list(range(10, 101, 10)) and m["tokens"].tolist() == list(range(100, 1001, 100))
    assert m["records"].tolist() == [10] * 10
    assert m["loss"] == pytest.approx([4.5] * 10) and m["loss_min"].tolist() == [0] * 10
    assert m["loss_max"].tolist() == [9] * 10 and m["lr"] == pytest.approx([s / 100 + 0.055 for s in range(0, 100, 10)])


def eleven_million_step_history(path: Path) -> int:
    """The log of the Pile config's run as Metrics writes it: 11.5 M steps, a record per 115 steps and per
    checkpoint (every 20,000 steps), a validation every 20,000 steps. Returns the number of records."""
    steps, every = 11_500_000, steps_per_record(11_500_000)
    record_steps = np.union1d(np.arange(every, steps + 1, every), np.arange(20_000, steps + 1, 20_000))
    rng = np.random.default_rng(0)
    loss = (3.0 + 8.0 * np.exp(-record_steps / 2e5) + rng.normal(0, 0.05, len(record_steps))).tolist()
    with open(path, "wb") as fh:
        fh.write(orjson.dumps({"kind": "val", "step": 0, "tokens": 0, "val_loss": 10.9}) + b"\n")
        for i, s in enumerate(record_steps.tolist()):
            fh.write(orjson.dumps({"kind": "train", "step": s, "batches": s, "tokens": 1870 * s, "loss": loss[i],
                                   "lr": 2.5e-4 * min(1.0, s / 40_000), "grad_norm": 0.4, "tokens_per_s": 150_000.0,
                                   "elapsed_s": s / 80}) + b"\n")
            if s % 20_000 == 0:
                fh.write(orjson.dumps({"kind": "val", "step": s, "tokens": 1870 * s, "val_loss": loss[i]}) + b"\n")
    return len(record_steps) + steps // 20_000 + 1


def test_an_11_million_step_history_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "metrics.jsonl"
    n_records = eleven_million_step_history(path)
    assert n_records > 100_000 and path.stat().st_size > 15e6
    tracemalloc.start()
    try:
        m = report.read_metrics(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Parsed into Python objects, the log would take ~100 MB; the bins and one batch of pending records, ~4 MB.
    assert peak < 8e6, f"{peak / 1e6:.1f} MB"
    assert len(m["train"]["step"]) <= report.BINS and m["train"]["step"][-1] == 11_500_000
    assert m["train"]["records"].sum() == n_records - 576 and m["val"]["records"].sum() == 576
    assert m["train"]["loss"][0] > 10 and abs(m["train"]["loss"][-1] - 3.0) < 0.05
    plots = tmp_path / "training.png", tmp_path / "throughput.png"
    report.plot_training(m, None, plots[0])
    report.plot_throughput(m, plots[1])
    assert all(image(p)[..., :3].std() > 0.05 for p in plots)
