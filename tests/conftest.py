"""Shared fixtures: tiny random checkpoints built from configs and saved to temp folders, standing in for Hub ids."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist the workers share the cores: one thread each on 2 cores, not 2 threads fighting for one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=3,
    id2label={0: "cat", 1: "dog", 2: "bird"},
    label2id={"cat": 0, "dog": 1, "bird": 2},
)


def launch_two_cpu_processes(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of `args` on 2 CPU processes (gloo), on a free port: the machine may be running another
    test suite, whose launches would otherwise meet this one's on accelerate's default port and hang."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # On a machine without GPUs, `accelerate launch --multi_gpu` starts torchrun and Accelerate runs MULTI_CPU (gloo);
    # `--cpu --num_processes 2` alone would start a single process.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", *args]  # fmt: skip
    pipe = subprocess.PIPE
    with subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # kill the rank processes too (torchrun starts them in sessions of their own)
            for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                child.kill()
            out, err = process.communicate()
            pytest.fail(f"accelerate launch hung for {timeout} s; its stderr ended with:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# Captions for the tiny dual encoders' tokenizers: lowercase letters and a few marks, as the prompts use them.
CAPTIONS = [f"a photo of a {name}." for name in ("cat", "dog", "bird", "t-shirt", "trouser", "ankle boot")]


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (54 tokens; start 0, end 1), built offline."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + ".,-":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_siglip_tokenizer(folder: Path):
    """A SigLIP sentencepiece tokenizer trained offline on `CAPTIONS` (written to `folder`/spiece.model)."""
    import io

    import sentencepiece
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 4), model_writer=model, vocab_size=40, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return SiglipTokenizer(str(folder / "spiece.model"))


def error_line(err: str) -> str:
    """The one error line of a command's stderr, which may hold its log before it (the log goes to stderr): the last
    line, the only one that is an error, with no traceback."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("retrofit: error: ") and "Traceback" not in err, err[-2000:]
    assert sum(line.startswith("retrofit: error: ") for line in lines) == 1, err[-2000:]
    return lines[-1]


def save_tiny(model, path: Path, image_size: int = 32) -> Path:
    """Save a model plus an image processor, as a Hub checkpoint folder would have."""
    from transformers import ViTImageProcessor

    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


@contextlib.contextmanager
def auto_classes_registered():
    """`retrofit.register_auto_classes()` for the block only: registering changes what every later load in the process
    gets (an export loaded with trust_remote_code would come back as retrofit's class, not its own code's)."""
    from transformers.models.auto import auto_factory, configuration_auto, modeling_auto

    from retrofit.hub_code import register_auto_classes

    mappings = [configuration_auto.CONFIG_MAPPING] + [
        value for value in vars(modeling_auto).values() if isinstance(value, auto_factory._LazyAutoMapping)
    ]
    saved = [dict(mapping._extra_content) for mapping in mappings]
    register_auto_classes()
    try:
        yield
    finally:
        for mapping, content in zip(mappings, saved, strict=True):
            mapping._extra_content.clear()
            mapping._extra_content.update(content)


def onnx_run(model, pixels: torch.Tensor, path: Path, output: str, *, dynamo: bool = True) -> torch.Tensor:
    """The README's deployment path: `torch.onnx.export` `model` with a dynamic batch (traced at batch 2, with the
    dynamo exporter, or the TorchScript one for models whose code the dynamo one cannot take), then ONNX Runtime on
    `pixels` (another batch size); returns its first output, named `output`."""
    import onnxruntime

    example = {"pixel_values": torch.randn(2, *pixels.shape[1:])}
    batch = (
        {"dynamic_shapes": {"pixel_values": {0: torch.export.Dim("batch")}}}
        if dynamo
        else {"dynamic_axes": {"pixel_values": {0: "batch"}}}
    )
    torch.onnx.export(model, kwargs=example, f=path, dynamo=dynamo, input_names=["pixel_values"],
                      output_names=[output], **batch)  # fmt: skip
    return torch.from_numpy(onnxruntime.InferenceSession(path).run(None, {"pixel_values": pixels.numpy()})[0])


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return save_tiny(ViTForImageClassification(ViTConfig(**TINY)), tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="session")
def tiny_deit(tmp_path_factory) -> Path:
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(1)
    return save_tiny(DeiTForImageClassification(DeiTConfig(**TINY)), tmp_path_factory.mktemp("deit") / "tiny-deit")


@pytest.fixture(scope="session")
def tiny_deit_distilled(tmp_path_factory) -> Path:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(2)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY))
    return save_tiny(model, tmp_path_factory.mktemp("deitd") / "tiny-deit-distilled")


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


HUB_ID = "someone/colours"


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """Serve `HUB_ID` from parquet files; returns the calls to `datasets.load_dataset` and `get_dataset_split_names`
    (the latter as ``{"split_names": revision}``) and the full train split."""
    import datasets
    import numpy as np
    from test_data import make_imagefolder

    root = tmp_path / "hub"
    folder = datasets.load_dataset("imagefolder", data_dir=str(make_imagefolder(tmp_path / "colours", per_class=10)))
    train = datasets.Dataset.from_dict(  # images stored as bytes in the parquet file, as on the Hub
        {"image": [np.asarray(image) for image in folder["train"]["image"]], "label": folder["train"]["label"]},
        features=folder["train"].features,
    )
    train.to_parquet(str(root / "train.parquet"))
    folder["test"].to_parquet(str(root / "test.parquet"))  # images named by path only
    files = {split: str(root / f"{split}.parquet") for split in ("train", "test")}
    calls: list[dict] = []
    real_load = datasets.load_dataset

    def load_dataset(path, split=None, streaming=False, **kwargs):
        if path != HUB_ID:
            return real_load(path, split=split, streaming=streaming, **kwargs)
        calls.append({"split": split, "streaming": streaming} | ({"revision": kwargs["revision"]} if kwargs else {}))
        return real_load("parquet", data_files=files, split=split, streaming=streaming)

    def split_names(path, revision=None, **kwargs):
        if revision is not None:  # (a call without one is not recorded: the tests before revisions count calls)
            calls.append({"split_names": revision})
        return list(files)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    # datasets waits 5 s after each parquet stream it read (https://github.com/apache/arrow/issues/45214): a pause
    # for a real download, 15 s of a test that streams three tiny local splits
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)  # newer datasets only
    return calls, real_load("parquet", data_files=files, split="train")
