"""Data: the bundled digits, worker splits, the user's .npz and its validation, the sampler."""

import numpy as np
import pytest

from coopsgd.app import data


class TestDigits:
    def test_bundled_digits_shape_and_range(self):
        ds = data.load_digits(test_fraction=0.2, seed=0)
        assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
        assert len(ds.y_train) + len(ds.y_test) == 1797
        assert len(ds.y_test) == round(0.2 * 1797)
        assert ds.num_classes == 10
        assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
        # 1797 images, classes 0..9 each with 174..183 examples (the UCI test set).
        counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
        assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]

    def test_holdout_is_a_partition_and_seeded(self):
        a, b = data.load_digits(seed=1), data.load_digits(seed=1)
        np.testing.assert_array_equal(a.y_test, b.y_test)
        c = data.load_digits(seed=2)
        assert not np.array_equal(a.x_test, c.x_test)

    def test_bad_test_fraction(self):
        with pytest.raises(ValueError, match="test_fraction"):
            data.load_digits(test_fraction=1.0)


class TestSplits:
    def test_iid_sizes_and_partition(self):
        shards = data.split_iid(10, 3, seed=0)
        assert [len(s) for s in shards] == [4, 3, 3]
        assert sorted(np.concatenate(shards).tolist()) == list(range(10))

    @pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
    def test_dirichlet_partition_nonempty(self, alpha):
        y = np.repeat(np.arange(10), 30)
        shards = data.split_dirichlet(y, 8, alpha, seed=3)
        assert len(shards) == 8 and all(len(s) > 0 for s in shards)
        assert sorted(np.concatenate(shards).tolist()) == list(range(300))

    def test_dirichlet_small_alpha_is_skewed(self):
        y = np.repeat(np.arange(10), 100)

        def mean_classes(alpha):
            shards = data.split_dirichlet(y, 8, alpha, seed=0)
            # Classes that hold at least 10% of a worker's shard.
            return np.mean([np.sum(np.bincount(y[s], minlength=10) >= 0.1 * len(s)) for s in shards])

        assert mean_classes(0.05) < 3.0 < mean_classes(100.0)

    def test_more_workers_than_examples(self):
        with pytest.raises(ValueError, match="exceeds the 5 training examples"):
            data.split_iid(5, 6)
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            data.split_iid(5, 0)

    def test_bad_alpha_and_name(self):
        with pytest.raises(ValueError, match="alpha"):
            data.split_dirichlet(np.zeros(10), 2, 0.0)
        with pytest.raises(ValueError, match="valid splits: iid, dirichlet"):
            data.split(np.zeros(10), 2, "bogus")


class TestNpz:
    def test_round_trip(self, tmp_path):
        x = np.arange(40 * 6, dtype=np.float64).reshape(40, 6)
        y = np.arange(40) % 3
        path = tmp_path / "mine.npz"
        np.savez(path, x=x, y=y)
        ds = data.load_npz(path, test_fraction=0.25, seed=0)
        assert ds.num_classes == 3 and ds.name == "mine" and ds.input_shape == (6,)
        assert len(ds.y_test) == 10
        # Each row keeps its label: x[i, 0] = 6 i and y = i mod 3.
        rows = np.concatenate([ds.x_train, ds.x_test])[:, 0] / 6
        labels = np.concatenate([ds.y_train, ds.y_test])
        np.testing.assert_array_equal(rows.astype(int) % 3, labels)

    def test_images_get_a_channel(self, tmp_path):
        np.savez(tmp_path / "img.npz", x=np.zeros((4, 5, 5)), y=np.array([0, 1, 0, 1]))
        assert data.load_npz(tmp_path / "img.npz").input_shape == (5, 5, 1)

    @pytest.mark.parametrize(
        "arrays, match",
        [
            ({"x": np.zeros((4, 2))}, "lacks"),
            ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "4 examples but y has 3"),
            ({"x": np.full((4, 2), np.nan), "y": np.zeros(4)}, "non-finite"),
            ({"x": np.zeros((4, 2)), "y": np.array([0, 1.5, 0, 1])}, "integer class labels"),
            ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "integer class labels"),
            ({"x": np.zeros(4), "y": np.zeros(4)}, "shape"),
        ],
    )
    def test_malformed(self, tmp_path, arrays, match):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=match):
            data.load_npz(path)

    def test_missing_and_not_npz(self, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            data.load_npz(tmp_path / "nope.npz")
        (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
        with pytest.raises(ValueError, match="not a valid .npz"):
            data.load_npz(tmp_path / "junk.npz")


class TestSampler:
    def test_batches_come_from_own_shard_and_are_pure_in_step(self):
        x = np.arange(20, dtype=np.float32)[:, None]
        y = np.arange(20) % 2
        shards = [np.arange(0, 5), np.arange(5, 20)]
        s = data.WorkerSampler(x, y, shards, batch_size=7, seed=4)
        b = s.batch(11)
        assert b["x"].shape == (2, 7, 1) and b["y"].shape == (2, 7)
        assert set(b["x"][0, :, 0].astype(int)) <= set(range(5))
        assert set(b["x"][1, :, 0].astype(int)) <= set(range(5, 20))
        np.testing.assert_array_equal(s.indices(11), data.WorkerSampler(x, y, shards, 7, 4).indices(11))
        assert not np.array_equal(s.indices(11), s.indices(12))
        stacked = s.batches(10, 3)
        np.testing.assert_array_equal(stacked["x"][1], b["x"])

    def test_bad_batch_size(self):
        with pytest.raises(ValueError, match="batch_size"):
            data.WorkerSampler(np.zeros((3, 1)), np.zeros(3), [np.arange(3)], 0)
