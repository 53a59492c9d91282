"""Metrics while a run goes: the JSON-lines records and TensorBoard event files agree with the
run's own results, with hand-derived times and bytes, and survive a resume."""

import json
import struct

import pytest

from coopsgd.app import config, data
from coopsgd.app import experiment as ex
from coopsgd.app.metrics import MetricsWriter

SMALL = {"steps": 32, "eval_every": 16, "workers": 4, "batch_size": 8, "tau": 4,
         "runtime.compute": "constant", "runtime.compute_time": 0.01,
         "runtime.comm": "constant", "runtime.comm_time": 0.05}


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tfrecords(path):
    """The scalar summaries of a TensorBoard event file, read from the TFRecord framing (length,
    its CRC, the payload, its CRC) with the Event protobuf: ``{tag: [(step, value), ...]}``."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    raw = path.read_bytes()
    at = 0
    while at < len(raw):
        (n,) = struct.unpack("<Q", raw[at:at + 8])
        event = event_pb2.Event.FromString(raw[at + 12:at + 12 + n])
        at += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


class TestRecords:
    def test_one_record_per_round_and_per_evaluation(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd"})
        res = ex.run(cfg, dataset=digits, metrics_dir=tmp_path)
        recs = _records(tmp_path / "local_sgd.jsonl")
        rounds = [r for r in recs if r["kind"] == "round"]
        evals = [r for r in recs if r["kind"] == "eval"]
        # 32 steps of tau = 4: 8 averagings, at steps 4, 8, ..., 32; each round takes 4 * 0.01 of
        # compute and 0.05 of communication.
        assert [r["step"] for r in rounds] == list(range(4, 33, 4))
        assert [r["round"] for r in rounds] == list(range(1, 9))
        for i, r in enumerate(rounds, 1):
            assert r["time"] == pytest.approx(i * (4 * 0.01 + 0.05))
        per_round = res["summary"]["bytes_communicated"] / 8
        assert [r["bytes"] for r in rounds] == pytest.approx([per_round * i for i in range(1, 9)])
        assert rounds[-1]["bytes"] == pytest.approx(res["summary"]["bytes_communicated"])
        h = res["history"]
        assert [r["step"] for r in evals] == h["step"] == [0, 16, 32]
        assert [r["loss"] for r in evals] == h["loss"]
        assert [r["test_accuracy"] for r in evals] == h["test_accuracy"]
        assert evals[0]["batch_loss"] is None  # no step taken yet: null, never NaN in JSON

    def test_tensorboard_events_hold_the_same_scalars(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd", "steps": 16})
        ex.run(cfg, dataset=digits, metrics_dir=tmp_path)
        recs = _records(tmp_path / "local_sgd.jsonl")
        files = list((tmp_path / "tensorboard" / "local_sgd").glob("events.out.tfevents.*"))
        assert len(files) == 1
        scalars = _tfrecords(files[0])
        evals = [(r["step"], r["loss"]) for r in recs if r["kind"] == "eval"]
        assert [s for s, _ in scalars["eval/loss"]] == [s for s, _ in evals]
        assert [v for _, v in scalars["eval/loss"]] == pytest.approx([v for _, v in evals], rel=1e-6)
        assert [s for s, _ in scalars["round/time"]] == [4, 8, 12, 16]

    def test_only_the_chosen_format(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd", "steps": 8, "eval_every": 8})
        ex.run(cfg, dataset=digits, metrics_dir=tmp_path / "j", metrics="jsonl")
        ex.run(cfg, dataset=digits, metrics_dir=tmp_path / "t", metrics="tensorboard")
        assert (tmp_path / "j" / "local_sgd.jsonl").exists() and not (tmp_path / "j" / "tensorboard").exists()
        assert (tmp_path / "t" / "tensorboard").is_dir() and not (tmp_path / "t" / "local_sgd.jsonl").exists()
        with pytest.raises(ValueError, match="metrics must be one of both, jsonl, tensorboard, none, got 'csv'"):
            MetricsWriter(tmp_path, "x", "csv")

    def test_resume_drops_records_past_the_checkpoint(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd"})
        ex.run(cfg, dataset=digits, metrics_dir=tmp_path / "full")
        ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path / "ck", checkpoint_every=16, stop_at=16,
               metrics_dir=tmp_path / "cut")
        path = tmp_path / "cut" / "local_sgd.jsonl"
        # what a run killed after its checkpoint at 16 leaves: records past it and a torn last line
        with path.open("a") as f:
            f.write(json.dumps({"kind": "round", "step": 20, "time": 9.0}) + "\n" + '{"kind": "ro')
        ex.run(cfg, dataset=digits, checkpoint_dir=tmp_path / "ck", resume=tmp_path / "ck",
               metrics_dir=tmp_path / "cut")
        assert path.read_text() == (tmp_path / "full" / "local_sgd.jsonl").read_text()

    def test_a_fresh_run_replaces_earlier_records(self, digits, tmp_path):
        cfg = config.make_config(SMALL, {"algorithm": "local_sgd", "steps": 8, "eval_every": 8})
        for _ in range(2):
            ex.run(cfg, dataset=digits, metrics_dir=tmp_path)
        assert [r["step"] for r in _records(tmp_path / "local_sgd.jsonl")] == [0, 4, 8, 8]
        assert len(list((tmp_path / "tensorboard" / "local_sgd").iterdir())) == 1


class TestFailures:
    def test_a_full_disk_is_reported_once_and_the_run_goes_on(self, tmp_path):
        import errno

        said = []
        writer = MetricsWriter(tmp_path, "run", note=said.append)
        writer.write("round", {"step": 1, "time": 0.5})

        class Full:
            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run.jsonl"))

            def close(self):
                pass

        writer._file = Full()
        writer.write("round", {"step": 2, "time": 1.0})
        writer.write("round", {"step": 3, "time": 1.5})  # nothing more is tried, nothing more is said
        writer.close()
        assert said == [f"metrics not written from here on (No space left on device {str(tmp_path / 'run.jsonl')!r}); "
                        "the run goes on"]
        assert [r["step"] for r in _records(tmp_path / "run.jsonl")] == [1]

    def test_a_folder_that_cannot_be_made_is_reported(self, tmp_path):
        (tmp_path / "file").write_text("")
        said = []
        writer = MetricsWriter(tmp_path / "file" / "metrics", "run", note=said.append)
        writer.write("eval", {"step": 0, "loss": 1.0})
        assert len(said) == 1 and said[0].startswith("metrics not written from here on (")
