"""Same weights, same embeddings: clipmoe against open_clip's own model, both ways through the adapter."""
import dataclasses
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clipmoe
from clipmoe import adapter


def _open_clip_model(arch):
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():  # non-zero biases and gains everywhere, so no key can go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(arch):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer(arch)(["a photo of a cat", "a diagram of a sparse mixture of experts layer"])
    return images, tokens


@pytest.mark.parametrize("arch,fmt", [("ViT-B-32", ".bin"), ("ViT-B-32", ".safetensors"),
                                      ("ViT-B-16-quickgelu", ".pt"), ("ViT-M-16-alt", ".safetensors")])
def test_same_embeddings_as_open_clip(tmp_path, arch, fmt):
    ref = _open_clip_model(arch)
    path = tmp_path / f"weights{fmt}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == ".safetensors":
        save_file(sd, str(path))
    elif fmt == ".pt":
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # DDP-style wrapper
    else:
        torch.save(sd, path)
    model = clipmoe.create_model(arch, pretrained=str(path))
    assert model.config.quick_gelu == arch.endswith("quickgelu")
    images, tokens = _inputs(arch)
    with torch.no_grad():
        for ours, theirs in [(model.encode_image(images), ref.encode_image(images)),
                             (model.encode_text(tokens), ref.encode_text(tokens)),
                             (model.encode_text(tokens, normalize=True), ref.encode_text(tokens, normalize=True))]:
            assert (ours - theirs).abs().max().item() < 1e-5
        assert torch.allclose(model.logit_scale, ref.logit_scale)


def test_openai_torchscript_archive(tmp_path):
    ref = _open_clip_model("ViT-B-32")
    images, tokens = _inputs("ViT-B-32")
    archive = torch.jit.trace_module(ref, {"encode_image": images[:1]}, check_trace=False)
    archive.save(str(tmp_path / "ViT-B-32.pt"))  # what OpenAI ships: a TorchScript archive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing for the user to act on (torch's deprecation of TorchScript)
        model = clipmoe.create_model("ViT-B-32", pretrained=str(tmp_path / "ViT-B-32.pt"))
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() < 1e-5
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() < 1e-5


def test_layer_scale_and_logit_bias_upcycled_from_open_clip(tmp_path):
    """Layer scale (open_clip's `ls_init_value`) on both towers and a SigLIP logit bias: read from the weights
    alone, upcycled to an MoE model that gives open_clip's embeddings, and written back in open_clip's format."""
    torch.manual_seed(0)
    oc = open_clip.model.CLIP(
        embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                                  "ls_init_value": 0.1},
        text_cfg={"context_length": 16, "width": 64, "heads": 2, "layers": 2, "ls_init_value": 0.1},
        init_logit_bias=-10.0).eval()
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    up = clipmoe.upcycle(oc, num_experts=4, top_k=2, every=1).eval()
    assert up.config.vision.ls_init_value is not None and up.config.text.ls_init_value is not None
    assert torch.equal(up.logit_bias, oc.logit_bias) and torch.equal(up.logit_scale, oc.logit_scale)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenize(["a photo of a cat", "a red square"], context_length=16)
    with torch.no_grad():
        assert (up.encode_image(images) - oc.encode_image(images)).abs().max() < 1e-5
        assert (up.encode_text(tokens) - oc.encode_text(tokens)).abs().max() < 1e-5
    cfg = up.config
    dense = clipmoe.create_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, moe=None),
                                                     text=dataclasses.replace(cfg.text, moe=None)))
    dense.load_state_dict(adapter.from_open_clip(oc.state_dict()))
    assert set(adapter.to_open_clip(dense.state_dict())) == set(oc.state_dict()) - {"attn_mask"}


def test_state_dict_round_trip_to_open_clip():
    ref = _open_clip_model("ViT-B-32")
    ours = adapter.from_open_clip(ref.state_dict())
    back = adapter.to_open_clip(ours)
    expected = {k: v for k, v in ref.state_dict().items() if k != "attn_mask"}
    assert set(back) == set(expected)
    for k in expected:
        assert torch.equal(back[k], expected[k]), k
    fresh = open_clip.create_model("ViT-B-32", pretrained=None)
    fresh.load_state_dict(back, strict=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_save_open_clip_loads_in_open_clip(tmp_path, suffix):
    ours = clipmoe.create_model("ViT-B-32")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = clipmoe.save_open_clip(ours, tmp_path / f"oc{suffix}")
    theirs = open_clip.create_model("ViT-B-32", pretrained=str(path)).eval()
    images, tokens = _inputs("ViT-B-32")
    with torch.no_grad():
        assert (ours.encode_image(images) - theirs.encode_image(images)).abs().max() < 1e-5
        assert (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() < 1e-5


def test_moe_model_cannot_be_written_as_open_clip():
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2)
    with pytest.raises(clipmoe.ClipmoeError, match="MoE"):
        adapter.to_open_clip(model.state_dict())


def test_list_pretrained_is_open_clips_for_our_architectures():
    pairs = clipmoe.list_pretrained()
    assert ("ViT-B-32", "laion2b_s34b_b79k") in pairs and ("ViT-L-14", "openai") in pairs
    supported = set(clipmoe.list_architectures())
    assert all(arch in supported for arch, _ in pairs)
    assert set(pairs) == {p for p in open_clip.list_pretrained() if p[0] in supported}
    assert not any(arch.startswith("RN50") for arch, _ in pairs)


def test_pretrained_tag_offline_is_one_line_error():
    with pytest.raises(clipmoe.ClipmoeError) as e:
        clipmoe.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    msg = str(e.value)
    assert "laion2b_s34b_b79k" in msg and "\n" not in msg


def test_unknown_tag_and_missing_file(tmp_path, monkeypatch):
    with pytest.raises(clipmoe.ClipmoeError, match="unknown pretrained tag 'nope'"):
        clipmoe.create_model("clipmoe-micro", pretrained="nope")
    with pytest.raises(clipmoe.ClipmoeError, match="not found"):
        clipmoe.create_model("clipmoe-micro", pretrained="/no/such/file.bin")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()  # a folder named like a tag: the folder is meant
    with pytest.raises(clipmoe.ClipmoeError, match="'run' is a folder; give the checkpoint file in it"):
        clipmoe.create_model("clipmoe-micro", pretrained="run")


def test_a_checkpoint_given_for_the_architecture_names_the_call_to_make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("micro.bin", "micro.safetensors"):
        clipmoe.save_open_clip(clipmoe.create_model("clipmoe-micro"), name)
        said = (rf"^{name} holds open_clip weights, .*: clipmoe.create_model\('clipmoe-micro', pretrained='{name}'\), "
                rf"or --model clipmoe-micro --pretrained {name}$")
        for read in (clipmoe.create_model, clipmoe.load):  # the architecture's place, a model file's
            with pytest.raises(clipmoe.ClipmoeError, match=said):
                read(name)
    torch.save({"w": torch.zeros(2)}, "other.pt")
    with pytest.raises(clipmoe.ClipmoeError, match=r"^other.pt: cannot tell the architecture.*not a ViT CLIP"):
        clipmoe.create_model("other.pt")
    with pytest.raises(clipmoe.ClipmoeError, match="^checkpoint not found: none.bin$"):
        clipmoe.create_model("none.bin")
    (tmp_path / "run").mkdir()
    with pytest.raises(clipmoe.ClipmoeError, match="^run is a folder with no model file in it$"):
        clipmoe.create_model("run")
    clipmoe.save(clipmoe.create_model("clipmoe-micro"), "run/model.safetensors")
    with pytest.raises(clipmoe.ClipmoeError,
                       match="^run is a folder; give the model file in it: run/model.safetensors$"):
        clipmoe.create_model("run")


def test_mismatched_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "b32.bin"
    torch.save(_open_clip_model("ViT-B-32").state_dict(), path)
    with pytest.raises(clipmoe.ClipmoeError) as e:
        clipmoe.create_model("ViT-B-16", pretrained=str(path))
    assert "does not match ViT-B-16" in str(e.value) and "\n" not in str(e.value)
    assert "clipmoe model" not in str(e.value)  # the architecture's place is for clipmoe files


def test_a_clipmoe_model_as_pretrained_weights(tmp_path):
    moe = clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 2}})
    path = clipmoe.save(moe, tmp_path / "moe.safetensors")
    same = clipmoe.create_model("clipmoe-micro", pretrained=str(path), vision={"moe": {"num_experts": 2}})
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in same.state_dict().items())
    with pytest.raises(clipmoe.ClipmoeError, match="does not match clipmoe-micro.*is a clipmoe model.*model.arch"):
        clipmoe.create_model("clipmoe-micro", pretrained=str(path))


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(clipmoe.ClipmoeError) as e:
        clipmoe.create_model("clipmoe-micro", pretrained=str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-B-32-quickgelu",
                                  "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-H-14-quickgelu"])
def test_architectures_match_open_clip_shapes(arch):
    cfg = clipmoe.get_model_config(arch)
    oc = open_clip.get_model_config(arch)
    assert cfg.embed_dim == oc["embed_dim"]
    assert cfg.vision.depth == oc["vision_cfg"]["layers"] and cfg.text.depth == oc["text_cfg"]["layers"]
    assert cfg.quick_gelu == oc.get("quick_gelu", False)
    assert arch in clipmoe.list_architectures()


def test_every_architecture_is_read_back_from_its_weights():
    import dataclasses

    from clipmoe.architectures import config_from_weights
    from clipmoe.model import CLIP

    def shapes(cfg):
        with torch.device("meta"):  # shapes without memory: ViT-e-14 has 4.4 B parameters
            return {k: v.shape for k, v in CLIP(cfg).state_dict().items()}

    for arch in clipmoe.list_architectures():  # open_clip's heads and ratios (bigG: 16 heads of 104, 4.9231)
        cfg = clipmoe.get_model_config(arch)
        with torch.device("meta"):
            state = CLIP(cfg).state_dict()
        assert config_from_weights(state, quick_gelu=cfg.quick_gelu) == cfg, arch
    # shapes no architecture has: heads of 64 where the width allows, and the same hidden widths
    # (a width of 11 with 60 hidden units: int(11 * (60 / 11)) is 59, so 60 / 11 is not a ratio that gives 60)
    base = clipmoe.get_model_config("clipmoe-micro")
    for width, ratio, heads in [(128, 3.0, 2), (11, 60.5 / 11, 1)]:
        cfg = dataclasses.replace(base, name="", vision=dataclasses.replace(base.vision, width=width, mlp_ratio=ratio,
                                                                             num_heads=1))
        state = {k: torch.empty(v, device="meta") for k, v in shapes(cfg).items()}
        got = config_from_weights(state)
        assert got.name == "" and got.vision.num_heads == heads and shapes(got) == shapes(cfg), (width, ratio)
    assert config_from_weights(state, num_heads=(11, 2)).vision.num_heads == 11  # given heads win


def test_unsupported_architecture_is_clear():
    with pytest.raises(clipmoe.ConfigError, match="not a plain ViT CLIP"):
        clipmoe.get_model_config("RN50")
    with pytest.raises(clipmoe.ConfigError, match="unknown architecture"):
        clipmoe.get_model_config("ViT-Q-99")
    # a near name is guessed, a different case first
    with pytest.raises(clipmoe.ConfigError, match=r"^unknown architecture 'vit-b-32' \(ViT-B-32\?\); see "):
        clipmoe.create_model("vit-b-32")
    with pytest.raises(clipmoe.ConfigError, match=r"^unknown architecture 'ViT-B-99' \(ViT-B-32 or ViT-B-16\?\)"):
        clipmoe.get_model_config("ViT-B-99")
    # a Hub name is said at once (open_clip would try to download its config, for half a minute offline)
    with pytest.raises(clipmoe.ConfigError, match=r"^hf-hub:org/m: models on the Hugging Face Hub are not fetched"):
        clipmoe.create_model("hf-hub:org/m")


def test_openai_names_are_open_clips():  # as open_clip's create_model takes them
    assert clipmoe.get_model_config("ViT-B/32") == clipmoe.get_model_config("ViT-B-32")
    assert clipmoe.create_model("ViT-B/16", vision={"depth": 1}, text={"depth": 1}).config.name == "ViT-B-16"
    assert clipmoe.get_tokenizer("ViT-B/32")(["a"]).shape == (1, 77)


def test_pretrained_tag_from_the_local_hub_cache(tmp_path):
    # weights already in the Hugging Face cache are used without any network (a fresh process: the hub
    # library reads HF_HUB_CACHE when imported)
    import os
    import subprocess
    import sys

    from open_clip.pretrained import get_pretrained_cfg

    repo = get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].rstrip("/")
    folder = tmp_path / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"stub")
    code = ("from open_clip.pretrained import get_pretrained_cfg; from clipmoe.factory import _cached_hub_file; "
            "print(_cached_hub_file(get_pretrained_cfg('ViT-B-32', 'laion2b_s34b_b79k')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_CACHE": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(snap / "open_clip_model.safetensors")


def test_patch_dropout_as_open_clip():
    """FLIP's patch dropout (vision patch_dropout): in training, the same kept patches and features as open_clip's
    model with its patch_dropout, from the same seed; in evaluation every patch; also from open_clip's config key."""
    oc_cfg = open_clip.get_model_config("ViT-B-32")
    oc_cfg["vision_cfg"] = {**oc_cfg["vision_cfg"], "patch_dropout": 0.5}
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**oc_cfg).train()
    model = clipmoe.create_model("ViT-B-32", vision={"patch_dropout": 0.5}).train()
    model.load_state_dict(adapter.from_open_clip(ref.state_dict()))
    images, _ = _inputs("ViT-B-32")
    for seed in (3, 4):
        torch.manual_seed(seed)
        theirs = ref.encode_image(images)
        torch.manual_seed(seed)
        ours = model.encode_image(images)
        assert (ours - theirs).abs().max().item() < 1e-5
    torch.manual_seed(5)  # another draw: other patches, other features
    assert (model.encode_image(images) - theirs).abs().max().item() > 1e-3
    ref.eval(), model.eval()
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max().item() < 1e-5
    kept = []
    model.image.blocks[0].register_forward_hook(lambda m, args, out: kept.append(args[0].shape[1]))
    model.train()(images, clipmoe.get_tokenizer(model)(["a", "b"]))
    model.eval()(images, clipmoe.get_tokenizer(model)(["a", "b"]))
    assert kept == [1 + 24, 1 + 49]  # the class token and half of the 7 x 7 patches (rounded down), then all
    assert clipmoe.architectures._translate("x", oc_cfg)["vision"]["patch_dropout"] == 0.5
    with pytest.raises(clipmoe.ConfigError, match="patch_dropout: 1.0 must be in"):
        clipmoe.create_model("clipmoe-micro", vision={"patch_dropout": 1.0})
