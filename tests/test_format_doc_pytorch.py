"""The PyTorch ``IterableDataset`` example of docs/FORMAT.md ("Reading without TensorFlow"),
run as it is written, against a real drpipe output. torch is not a dependency: the few names
the example takes from it are stood in (``IterableDataset = object``, ``get_worker_info``,
``DataLoader`` recording its arguments, ``torch.from_numpy`` over numpy), so what is tested is
the example's own code and drpipe's reader under it."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np

from tests.helpers import preprocess
from tfrecord_writer.reader import iter_split, split_shards

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs/FORMAT.md"


def example_code() -> str:
    """The python block that follows "A PyTorch `IterableDataset`" in docs/FORMAT.md."""
    text = FORMAT_MD.read_text()
    at = text.index("A PyTorch `IterableDataset`")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, at)
    assert m, "no python block after the PyTorch paragraph"
    return m.group(1)


class _Tensor:
    """torch.from_numpy's result, as far as the example uses it."""

    def __init__(self, a: np.ndarray):
        self.array = a

    def permute(self, *dims) -> _Tensor:
        return _Tensor(np.transpose(self.array, dims))


def _stand_ins(worker):
    data = types.ModuleType("torch.utils.data")
    data.IterableDataset = object  # torch's base class: the example defines all it needs

    class DataLoader:
        def __init__(self, dataset, **kw):
            self.dataset, self.kw = dataset, kw

    data.DataLoader = DataLoader
    data.get_worker_info = lambda: worker[0]
    torch = types.ModuleType("torch")
    torch.from_numpy = _Tensor
    torch.utils = types.ModuleType("torch.utils")
    torch.utils.data = data
    return {"torch": torch, "torch.utils": torch.utils, "torch.utils.data": data}


def test_format_md_pytorch_example_code_with_torchs_base_class_stood_in(
        synth_dir, tmp_path, monkeypatch):
    out = tmp_path / "shards"  # the example reads "shards" from the working directory
    preprocess("--src", synth_dir, "--out", out, "--size", 64, "--shard-size", 0.02,
               "--split", "train=0.8,val=0.1,test=0.1", "--workers", 1)
    assert len(split_shards(out, "train")) >= 3
    worker = [None]  # what get_worker_info() returns: None in the main process
    for name, module in _stand_ins(worker).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "format_md_example"}
    exec(compile(example_code(), str(FORMAT_MD), "exec"), scope)

    loader = scope["loader"]
    assert isinstance(loader.dataset, scope["DrpipeSplit"])
    assert loader.kw == {"batch_size": 32, "num_workers": 4}
    want = [(ex["image"].transpose(2, 0, 1), int(ex["image/class/label"]))
            for ex in iter_split(out, "train", decode_image=True)]
    got = [(image.array, label) for image, label in loader.dataset]
    assert len(got) == len(want) > 20
    for (a, la), (b, lb) in zip(got, want, strict=True):
        assert a.shape == (3, 64, 64) and a.dtype == np.uint8
        assert np.array_equal(a, b) and la == lb and type(la) is int

    # In a DataLoader worker each of 2 workers reads every other shard: together, each
    # record once.
    per_worker = []
    for i in range(2):
        worker[0] = types.SimpleNamespace(id=i, num_workers=2)
        per_worker.append([(image.array, label) for image, label in loader.dataset])
    assert per_worker[0] and per_worker[1]
    assert sorted(a.tobytes() for a, _ in per_worker[0] + per_worker[1]) == sorted(
        b.tobytes() for b, _ in want)
