"""Role shards of the real SmolLM2 model: the `shard` command, loading a shard directory (whole,
in part, under a memory budget), gguf-split input, and clear errors for bad shard sets."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from splitwise_core._core import Model
from splitwise_core.engine import Engine
from splitwise_core.errors import InvalidArgumentError, ModelFileError
from splitwise_core.shards import parse_size, shard_model
from splitwise_core.tokenizer import Tokenizer, bundled_model_path
from splitwise_device import cli

N_LAYER = 30
TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1092]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "smollm2"
    assert cli.main(["shard", str(model_path), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def plain_logits(model_path: Path) -> np.ndarray[Any, np.dtype[np.float32]]:
    return forward_logits(Model(str(model_path)))


def forward_logits(model: Model) -> np.ndarray[Any, np.dtype[np.float32]]:
    return model.forward(model.new_session(), TOKENS, list(range(len(TOKENS))), all_logits=True)


def file_size(path: Path) -> int:
    return path.stat().st_size


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return field.contents()


@pytest.mark.slow
def test_shard_command_writes_tagged_gguf_files_and_a_manifest(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main(["shard", str(model_path), str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if line.startswith("wrote ")]) == N_LAYER + 1
    assert "31 shards" in printed[-1]

    source_sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_sha256"] == source_sha256
    assert manifest["n_layer"] == N_LAYER
    assert [f["file"] for f in manifest["files"]] == ["base.gguf"] + [f"layer-{i:03d}.gguf" for i in range(N_LAYER)]
    assert [f["layer"] for f in manifest["files"]] == [None, *range(N_LAYER)]
    assert sum(f["bytes"] for f in manifest["files"]) >= file_size(model_path) * 0.99

    source = gguf.GGUFReader(model_path)
    source_tensors = {t.name: t for t in source.tensors}
    for entry in manifest["files"]:
        path = out / entry["file"]
        assert file_size(path) == entry["bytes"]
        reader = gguf.GGUFReader(path)
        assert field_value(reader, "splitwise.shard.source_sha256") == source_sha256
        assert field_value(reader, "splitwise.shard.role") == entry["role"]
        assert field_value(reader, "splitwise.shard.n_layer") == N_LAYER
        assert field_value(reader, "llama.block_count") == N_LAYER
        names = {t.name for t in reader.tensors}
        if entry["role"] == "base":
            assert names == {"token_embd.weight", "output_norm.weight"}
            assert reader.get_field("tokenizer.ggml.tokens") is not None
        else:
            layer = entry["layer"]
            assert field_value(reader, "splitwise.shard.layer") == layer
            assert names == {n for n in source_tensors if n.startswith(f"blk.{layer}.")}
            assert reader.get_field("tokenizer.ggml.tokens") is None
        for t in reader.tensors:
            original = source_tensors[t.name]
            assert t.tensor_type == original.tensor_type
            assert np.array_equal(t.data, original.data), f"{t.name} differs from the source"


def test_shard_command_refuses_a_non_empty_directory_unless_forced(
    tmp_path: Path, model_path: Path, shard_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli.main(["shard", str(model_path), str(busy)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(["shard", str(model_path), str(busy), "--force"]) == 1
    assert "not shards (notes.txt)" in capsys.readouterr().err
    assert (busy / "notes.txt").exists()

    again = tmp_path / "again"
    shutil.copytree(shard_dir, again)
    (again / "layer-031.gguf").write_bytes(b"stale shard of a bigger model")
    assert cli.main(["shard", str(model_path), str(again), "--force"]) == 0
    assert not (again / "layer-031.gguf").exists()
    assert len(list(again.glob("*.gguf"))) == N_LAYER + 1

    assert cli.main(["shard", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 1
    assert "missing.gguf" in capsys.readouterr().err
    assert cli.main(["shard", str(shard_dir / "base.gguf"), str(tmp_path / "y")]) == 1
    assert "already a shard" in capsys.readouterr().err


def test_sharded_model_logits_equal_the_plain_model_bit_for_bit(
    shard_dir: Path, plain_logits: np.ndarray[Any, np.dtype[np.float32]]
) -> None:
    model = Model(str(shard_dir))
    assert np.array_equal(forward_logits(model), plain_logits)
    stats = model.weight_stats()
    assert stats["budget_bytes"] is None and stats["files"] == N_LAYER + 1 and stats["evictions"] == 0
    big = Model(str(shard_dir), memory_budget_bytes=10**9)
    assert np.array_equal(forward_logits(big), plain_logits)
    assert big.weight_stats()["evictions"] == 0


@pytest.mark.parametrize("shape", ["qwen2_gqa4", "qwen3_gqa4", "gpt2_h6"])
def test_shards_of_the_other_architectures_carry_their_extra_tensors(shape: str, tmp_path: Path) -> None:
    """Qwen2's Q/K/V biases, Qwen3's Q/K norms and GPT-2's fused Q/K/V are blk.N tensors: they go to
    the layer shards (GPT-2's position embeddings to base.gguf)."""
    from evaluation import model_factory as mf

    source = mf.cached_random_llama(shape, "Q8_0")
    shard_model(source, tmp_path / "shards")
    extra = {
        "qwen2_gqa4": "blk.1.attn_k.bias",
        "qwen3_gqa4": "blk.1.attn_k_norm.weight",
        "gpt2_h6": "blk.1.attn_qkv.bias",
    }[shape]
    layer = gguf.GGUFReader(tmp_path / "shards" / "layer-001.gguf")
    assert extra in {t.name for t in layer.tensors}
    sharded = Model(str(tmp_path / "shards"), memory_budget_bytes=10**9)
    assert sharded.config["architecture"] == shape.split("_")[0]
    assert np.array_equal(forward_logits(sharded), forward_logits(Model(str(source))))


def test_budget_of_three_layers_gives_identical_logits_with_evictions(
    shard_dir: Path, plain_logits: np.ndarray[Any, np.dtype[np.float32]]
) -> None:
    budget = file_size(shard_dir / "base.gguf") + 3 * file_size(shard_dir / "layer-000.gguf")
    model = Model(str(shard_dir), memory_budget_bytes=budget)
    for _ in range(2):
        assert np.array_equal(forward_logits(model), plain_logits)
    stats = model.weight_stats()
    assert stats["evictions"] > 0 and stats["loads"] >= 2 * N_LAYER
    assert stats["peak_mapped_bytes"] is not None and stats["peak_mapped_bytes"] <= budget
    assert stats["mapped_files"] <= 4

    with pytest.raises(InvalidArgumentError, match="cannot hold"):
        Model(str(shard_dir), memory_budget_bytes=file_size(shard_dir / "base.gguf"))


def test_engine_generates_the_same_text_from_shards_under_a_budget(shard_dir: Path, model_path: Path) -> None:
    plain = Engine(model_path).generate("The capital of France is", max_tokens=6)
    budget = parse_size("40MB")
    sharded = Engine(shard_dir, memory_budget_bytes=budget)
    assert sharded.tokenizer.path == shard_dir / "base.gguf"
    assert sharded.generate("The capital of France is", max_tokens=6).tokens == plain.tokens
    assert sharded.model.weight_stats()["evictions"] > 0
    with pytest.raises(InvalidArgumentError, match="positive"):
        Engine(shard_dir, memory_budget_bytes=0)


def test_a_model_serving_ten_layers_rejects_the_others(shard_dir: Path, model_path: Path, tmp_path: Path) -> None:
    partial_dir = tmp_path / "first-ten"
    partial_dir.mkdir()
    for name in ["base.gguf", *(f"layer-{i:03d}.gguf" for i in range(10))]:
        (partial_dir / name).symlink_to(shard_dir / name)
    part = Model(str(partial_dir), layers=list(range(10)))
    assert part.served_layers == list(range(10))
    assert part.weight_stats()["files"] == 11
    full = Model(str(model_path))

    x = full.embed(TOKENS[:3])
    positions = [0, 1, 2]
    for layer in range(10):
        a = full.layer_fused(full.new_session(), layer, x, positions)
        b = part.layer_fused(part.new_session(), layer, x, positions)
        assert np.array_equal(a, b)
    with pytest.raises(InvalidArgumentError, match=r"layer 20 is not served .*layers 0-9"):
        part.ffn(20, "full", x)
    with pytest.raises(InvalidArgumentError, match="layer 10 is not served"):
        part.forward(part.new_session(), TOKENS[:3], positions)
    with pytest.raises(ModelFileError, match=r"layer 10 has no shard: layer-010\.gguf is missing"):
        Model(str(partial_dir))
    with pytest.raises(InvalidArgumentError, match="cannot serve layer 30"):
        Model(str(shard_dir), layers=[29, 30])


def copy_shards(shard_dir: Path, to: Path) -> Path:
    """A private copy: symlinks to the shared shards, so a test can replace single files."""
    to.mkdir()
    for path in shard_dir.glob("*.gguf"):
        (to / path.name).symlink_to(path)
    return to


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def other_model_shards(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """Shards of a different model: the same file with one weight byte changed."""
    root = tmp_path_factory.mktemp("other")
    data = bytearray(model_path.read_bytes())
    data[-1] ^= 0x01
    other = root / "other.gguf"
    other.write_bytes(bytes(data))
    shard_model(other, root / "shards")
    return root / "shards"


def test_bad_shard_sets_give_model_file_errors_naming_the_file(
    shard_dir: Path, other_model_shards: Path, tmp_path: Path
) -> None:
    foreign = copy_shards(shard_dir, tmp_path / "foreign")
    replace(foreign / "layer-003.gguf", (other_model_shards / "layer-003.gguf").read_bytes())
    with pytest.raises(ModelFileError, match=r"layer-003\.gguf: shard of another model"):
        Model(str(foreign))

    swapped = copy_shards(shard_dir, tmp_path / "swapped")
    replace(swapped / "layer-004.gguf", (shard_dir / "layer-005.gguf").read_bytes())
    with pytest.raises(ModelFileError, match=r"layer-004\.gguf: holds layer 5 but should hold layer 4"):
        Model(str(swapped))

    missing = copy_shards(shard_dir, tmp_path / "missing")
    (missing / "layer-007.gguf").unlink()
    with pytest.raises(ModelFileError, match=r"missing: layer 7 has no shard"):
        Model(str(missing))

    truncated = copy_shards(shard_dir, tmp_path / "truncated")
    replace(truncated / "layer-008.gguf", (shard_dir / "layer-008.gguf").read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match=r"layer-008\.gguf: .*truncated"):
        Model(str(truncated))

    magic = copy_shards(shard_dir, tmp_path / "magic")
    replace(magic / "layer-009.gguf", b"GGML" + (shard_dir / "layer-009.gguf").read_bytes()[4:])
    with pytest.raises(ModelFileError, match=r"layer-009\.gguf: not a GGUF file"):
        Model(str(magic))

    unknown_type = copy_shards(shard_dir, tmp_path / "unknown-type")
    data = bytearray((shard_dir / "layer-010.gguf").read_bytes())
    name = b"blk.10.ffn_up.weight"
    entry = data.index(len(name).to_bytes(8, "little") + name)
    type_at = entry + 8 + len(name) + 4 + 2 * 8  # after the name, n_dims = 2 and two dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == gguf.GGMLQuantizationType.Q4_1
    data[type_at : type_at + 4] = (4).to_bytes(4, "little")  # Q4_2, removed from ggml long ago
    replace(unknown_type / "layer-010.gguf", bytes(data))
    with pytest.raises(
        ModelFileError, match=r"layer-010\.gguf: .*blk\.10\.ffn_up\.weight.* unsupported ggml type id 4"
    ):
        Model(str(unknown_type))

    no_base = copy_shards(shard_dir, tmp_path / "no-base")
    (no_base / "base.gguf").unlink()
    with pytest.raises(ModelFileError, match=r"base\.gguf is missing"):
        Engine(no_base)
    with pytest.raises(ModelFileError, match=r"layer-000\.gguf: this is the shard of layer 0 alone"):
        Model(str(shard_dir / "layer-000.gguf"))


def test_a_shard_replaced_while_evicted_is_caught_when_mapped_again(
    shard_dir: Path, other_model_shards: Path, tmp_path: Path
) -> None:
    live = copy_shards(shard_dir, tmp_path / "live")
    budget = file_size(shard_dir / "base.gguf") + file_size(shard_dir / "layer-000.gguf")
    model = Model(str(live), memory_budget_bytes=budget, layers=[0, 1])
    x = model.embed(TOKENS[:2])
    model.attn_norm(0, x)
    model.attn_norm(1, x)  # evicts layer 0
    replace(live / "layer-000.gguf", (other_model_shards / "layer-000.gguf").read_bytes())
    with pytest.raises(ModelFileError, match=r"layer-000\.gguf: shard of another model"):
        model.attn_norm(0, x)


def test_unsupported_architecture_is_a_model_file_error(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match=r"falcon\.gguf: architecture \"falcon\" is not supported"):
        Model(str(path))


def write_gguf_split(model_path: Path, out: Path, max_tensors: int) -> list[Path]:
    """The model as a llama.cpp gguf-split set, written by gguf-py's own splitting writer."""
    reader = gguf.GGUFReader(model_path)
    writer = gguf.GGUFWriter(out / "split.gguf", "llama", split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return sorted(out.glob("split-*-of-*.gguf"))


@pytest.mark.slow
def test_gguf_split_input_is_merged(
    tmp_path: Path, model_path: Path, plain_logits: np.ndarray[Any, np.dtype[np.float32]]
) -> None:
    parts = write_gguf_split(model_path, tmp_path, max_tensors=120)
    assert [p.name for p in parts] == [f"split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    model = Model(str(parts[0]))
    assert np.array_equal(forward_logits(model), plain_logits)
    assert model.weight_stats()["files"] == 3
    assert Tokenizer(parts[0]).encode("Hello world") == Tokenizer(model_path).encode("Hello world")

    out = tmp_path / "from-split"
    manifest = shard_model(parts[0], out)
    assert manifest["n_layer"] == N_LAYER
    assert np.array_equal(forward_logits(Model(str(out))), plain_logits)
    reader = gguf.GGUFReader(out / "base.gguf")
    assert reader.get_field("split.count") is None

    with pytest.raises(ModelFileError, match=r"split-00002-of-00003\.gguf: this is split 2 of 3"):
        Model(str(parts[1]))
    parts[2].unlink()
    with pytest.raises(ModelFileError, match=r"split-00003-of-00003\.gguf: split 3 of 3 is missing"):
        Model(str(parts[0]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256MB", 256 * 10**6), ("1.5GiB", 3 * 2**29), ("4096", 4096), ("64 mib", 64 * 2**20), ("2kb", 2000)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "0", "12 parsecs", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


PEAK_RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    from splitwise_core._core import Model

    path, budget = sys.argv[1], json.loads(sys.argv[2])
    model = Model(path, memory_budget_bytes=budget)
    tokens = [1, 504, 3458, 282, 4649, 314, 7042, 30]
    model.forward(model.new_session(), tokens, list(range(len(tokens))))
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_kb": hwm, "stats": model.weight_stats()}))
    """
)


def peak_rss_kb(path: Path, budget: int | None) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(path), json.dumps(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return int(report["peak_rss_kb"])


def test_eviction_unmaps_so_peak_rss_stays_near_the_budget(shard_dir: Path, model_path: Path) -> None:
    budget = file_size(shard_dir / "base.gguf") + 3 * file_size(shard_dir / "layer-000.gguf")
    full = peak_rss_kb(model_path, None)
    tight = peak_rss_kb(shard_dir, budget)
    # The whole 98 MB file is touched by a full forward; under the budget only ~39 MB are mapped
    # at any time, so the peak must be lower by most of the evicted layers' bytes.
    evicted_bytes = file_size(model_path) - budget
    assert (full - tight) * 1024 > 0.7 * evicted_bytes, (full, tight, evicted_bytes)


def test_generate_and_perplexity_take_a_memory_budget(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = ["--prompt", "The capital of France is", "--max-tokens", "4"]
    assert cli.main(["generate", "--model", str(shard_dir), *prompt, "--json"]) == 0
    unlimited = json.loads(capsys.readouterr().out)
    assert cli.main(["generate", "--model", str(shard_dir), "--memory-budget", "40MB", *prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == unlimited["text"].strip()
    assert "budget 40.0 MB" in captured.err and "evictions" in captured.err

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert cli.main(["perplexity", "--model", str(shard_dir), "--text", str(text), "--memory-budget", "38.6MB"]) == 0
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(shard_dir), "--memory-budget", "12 parsecs", *prompt])
    assert exit_info.value.code == 2
    assert "expected a size" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(shard_dir), "--memory-budget", "1MB", *prompt]) == 1
    assert "cannot hold" in capsys.readouterr().err
