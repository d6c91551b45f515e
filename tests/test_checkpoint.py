"""clipmoe.save / clipmoe.load: safetensors with the config, never pickle, one-line errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

import clipmoe


def test_round_trip_moe_model(tmp_path):
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, top_k=2, every=1, noise_std=0.05,
                            per_block={1: {"num_experts": 2, "top_k": 1}})  # the file's JSON keys are strings
    path = clipmoe.save(model, tmp_path / "m.safetensors")
    back = clipmoe.load(path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    images = torch.randn(2, 3, 16, 16)
    tokens = clipmoe.get_tokenizer(model)(["x", "y z"])
    with torch.no_grad():
        assert torch.equal(back.encode_image(images), model.eval().encode_image(images))
        assert torch.equal(back.encode_text(tokens), model.encode_text(tokens))
    # create_model accepts the saved file as a spec, too
    assert clipmoe.create_model(str(path)).config == model.config


def test_file_holds_no_pickle(tmp_path):
    path = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "m.safetensors")
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert header["__metadata__"]["format"] == "clipmoe/3"
    assert json.loads(header["__metadata__"]["config"])["name"] == "clipmoe-micro"


@pytest.mark.parametrize("fmt, transposed", [("clipmoe/1", (".experts.w2",)),
                                              ("clipmoe/2", (".experts.w1", ".experts.w2"))])
def test_reads_earlier_formats_of_the_experts(tmp_path, fmt, transposed):
    """clipmoe/1 files stored experts.w2 as (E, hidden, width), clipmoe/2 files both expert matrices so; they load
    into today's (E, width, hidden), by clipmoe.load and as create_model's pretrained= weights. Hidden = width here
    (mlp_ratio 1), so that only the format, not the shapes, can tell the layouts apart."""
    overrides = {"vision": {"mlp_ratio": 1.0}, "text": {"mlp_ratio": 1.0}}
    dense = clipmoe.create_model("clipmoe-micro", **overrides)
    model = clipmoe.upcycle(dense, num_experts=3, noise_std=0.05).eval()
    old = {k: (v.transpose(-2, -1) if k.endswith(transposed) else v).contiguous()
           for k, v in model.state_dict().items()}
    assert any(not torch.equal(old[k], v) for k, v in model.state_dict().items())
    meta = {"format": fmt, "config": json.dumps(clipmoe.config.to_dict(model.config))}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    back = clipmoe.load(tmp_path / "old.safetensors")
    again = clipmoe.create_model(model.config, pretrained=str(tmp_path / "old.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_one_line_error(tmp_path, damage):
    path = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(clipmoe.ClipmoeError) as e:
        clipmoe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_files_read_and_damaged_ones_named(tmp_path, legacy):
    from clipmoe.checkpoint import read_checkpoint

    path = tmp_path / "m.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path, _use_new_zipfile_serialization=not legacy)
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(3.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(clipmoe.ClipmoeError, match=r"not a readable checkpoint \(.+\)$") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < len(str(path)) + 120
    path.write_bytes(b"hello, not a checkpoint\n")  # torch.load's own error for this: KeyError(104)
    with pytest.raises(clipmoe.ClipmoeError, match="not a checkpoint .neither safetensors nor a torch.save"):
        read_checkpoint(path)


def test_mismatched_and_foreign_files(tmp_path):
    model = clipmoe.create_model("clipmoe-micro")
    path = clipmoe.save(model, tmp_path / "m.safetensors")
    # weights of another shape under a valid config
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["text.proj"] = torch.zeros(3, 3)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(clipmoe.ClipmoeError, match="another shape"):
        clipmoe.load(tmp_path / "bad.safetensors")
    # a safetensors file that is not ours
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(clipmoe.ClipmoeError, match="not a clipmoe checkpoint"):
        clipmoe.load(tmp_path / "foreign.safetensors")
    with pytest.raises(clipmoe.ClipmoeError, match="not found"):
        clipmoe.load(tmp_path / "missing.safetensors")
