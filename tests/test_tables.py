"""Per-split feature tables: selection, records, tables from the release's features, and fusion by File_ID."""

import numpy as np

from exvo_jax.features import tables


def _table(file_ids, features, seed):
  """A hand-built table whose label columns identify the clip (age = 20 + the clip's number, etc.)."""
  rng = np.random.default_rng(seed)
  numbers = np.array([int(f[1:]) for f in file_ids])
  n = len(file_ids)
  emotions = rng.uniform(size=(n, 10)).astype(np.float32)
  emotions[numbers % 3 == 0] = np.nan  # some clips unlabelled
  return tables.SplitTable(features=np.asarray(features, np.float32), emotions=emotions,
                           age=(20.0 + numbers).astype(np.float32), country=(numbers % 4).astype(np.int32),
                           file_id=np.array(file_ids), speaker=np.array([f"s{k % 2}" for k in numbers]),
                           labelled=numbers % 3 != 0, category=np.full(n, -1, np.int32))


def test_fuse_keeps_the_first_order_drops_missing_clips_and_concatenates_matching_rows():
  # Table 1: clips c1..c4 with 2 features; table 2: the same clips in another order without c3, 3 features, plus a
  # clip (c9) that table 1 lacks; table 3: one feature, every clip, yet another order.
  first = _table(["c1", "c2", "c3", "c4"], [[1, 1], [2, 2], [3, 3], [4, 4]], seed=0)
  second = _table(["c4", "c9", "c2", "c1"], [[40, 41, 42], [90, 91, 92], [20, 21, 22], [10, 11, 12]], seed=1)
  third = _table(["c3", "c2", "c1", "c4", "c9"], [[300], [200], [100], [400], [900]], seed=2)
  fused = tables.fuse([first, second, third])
  assert list(fused.file_id) == ["c1", "c2", "c4"]
  np.testing.assert_array_equal(fused.features, [[1, 1, 10, 11, 12, 100], [2, 2, 20, 21, 22, 200],
                                                 [4, 4, 40, 41, 42, 400]])
  assert fused.features.dtype == np.float32
  # Labels and metadata are the first table's rows of the kept clips.
  keep = [0, 1, 3]
  for name in ("emotions", "age", "country", "speaker", "labelled", "category"):
    np.testing.assert_array_equal(getattr(fused, name), getattr(first, name)[keep], err_msg=name)
  # One table alone: unchanged.
  alone = tables.fuse([second])
  assert list(alone.file_id) == list(second.file_id)
  np.testing.assert_array_equal(alone.features, second.features)


def test_fuse_in_the_other_order_follows_that_table():
  first = _table(["c1", "c2", "c3", "c4"], [[1], [2], [3], [4]], seed=0)
  second = _table(["c4", "c2", "c1"], [[40], [20], [10]], seed=1)
  fused = tables.fuse([second, first])
  assert list(fused.file_id) == ["c4", "c2", "c1"]
  np.testing.assert_array_equal(fused.features, [[40, 4], [20, 2], [10, 1]])
  np.testing.assert_array_equal(fused.age, [24, 22, 21])


def test_select_takes_the_same_rows_of_every_column():
  table = _table(["c1", "c2", "c3", "c4", "c5"], np.arange(10).reshape(5, 2), seed=0)
  by_mask = table.select(np.array([False, True, False, True, True]))
  by_index = table.select(np.array([4, 1]))
  assert len(by_mask) == 3 and len(by_index) == 2
  assert list(by_mask.file_id) == ["c2", "c4", "c5"] and list(by_index.file_id) == ["c5", "c2"]
  np.testing.assert_array_equal(by_index.features, [[8, 9], [2, 3]])
  np.testing.assert_array_equal(by_index.age, [25, 22])
  np.testing.assert_array_equal(by_index.country, [1, 2])
  np.testing.assert_array_equal(by_index.speaker, ["s1", "s0"])
  np.testing.assert_array_equal(by_index.emotions, table.emotions[[4, 1]])
  np.testing.assert_array_equal(by_mask.labelled, [True, True, True])
  assert len(table) == 5  # the original table is left as it was


def test_records_fill_unlabelled_emotions_with_zeros_and_keep_types():
  table = _table(["c2", "c3"], [[1.5, 2.5], [3.5, 4.5]], seed=0)
  assert np.isnan(table.emotions[1]).all()  # c3 is unlabelled
  records = table.records()
  assert len(records) == 2
  np.testing.assert_array_equal(records[0]["emotions"], table.emotions[0])
  np.testing.assert_array_equal(records[1]["emotions"], np.zeros(10))
  np.testing.assert_array_equal(records[1]["features"], [3.5, 4.5])
  assert records[0]["age"] == 22.0 and isinstance(records[0]["age"], np.float32)
  assert records[1]["country"] == 3 and isinstance(records[1]["country"], np.int32)
  assert records[1]["category"] == -1 and isinstance(records[1]["category"], np.int32)
  assert (records[0]["file_id"], records[0]["speaker"]) == ("c2", "s0")


def test_from_release_fills_fields_a_corpus_lacks():
  """HUME-VB records carry emotions/age/country; EmoGator-style records carry a category and nothing else."""
  hume = [{"features": np.array([1.0, 2.0]), "file_id": b"[00001]", "speaker": b"Speaker_1",
           "emotions": np.linspace(0, 0.9, 10), "age": 31.0, "country": 2, "labelled": True},
          {"features": np.array([3.0, 4.0]), "file_id": "[00002]", "speaker": "Speaker_2",
           "emotions": np.full(10, np.nan), "age": np.nan, "country": -1, "labelled": False}]
  gator = [{"features": np.array([5.0]), "file_id": "g1", "speaker": "p1", "category": 7}]
  result = tables.from_release({"train": hume, "val": gator})
  train, val = result["train"], result["val"]
  np.testing.assert_array_equal(train.features, [[1, 2], [3, 4]])
  assert train.features.dtype == np.float32
  assert list(train.file_id) == ["[00001]", "[00002]"] and list(train.speaker) == ["Speaker_1", "Speaker_2"]
  np.testing.assert_allclose(train.emotions[0], np.linspace(0, 0.9, 10), rtol=1e-6)
  assert np.isnan(train.emotions[1]).all() and np.isnan(train.age[1]) and train.age[0] == 31.0
  np.testing.assert_array_equal(train.country, [2, -1])
  np.testing.assert_array_equal(train.labelled, [True, False])
  np.testing.assert_array_equal(train.category, [-1, -1])
  assert val.emotions.shape == (1, 10) and np.isnan(val.emotions).all()
  assert np.isnan(val.age[0]) and val.country[0] == -1 and val.category[0] == 7
  assert val.labelled[0]  # a categorical record is labelled by its category
