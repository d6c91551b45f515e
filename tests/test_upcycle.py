"""Sparse upcycling: experts copy the dense MLP, routers start at zero, and the model is unchanged."""
import warnings

import pytest
import torch

import clipmoe
from clipmoe.moe import MoE


def _outputs(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module")
def dense_b32():
    torch.manual_seed(0)
    model = clipmoe.create_model("ViT-B-32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _check_identity(dense, up, image_size, context):
    torch.manual_seed(2)
    images = torch.randn(3, 3, image_size, image_size)
    tokens = clipmoe.get_tokenizer(dense)(["a red square", "two blue circles at the top", ""])[:, :context]
    for mode in ("eval", "train"):
        dense.train(mode == "train")
        up.train(mode == "train")
        for a, b in zip(_outputs(dense, images, tokens), _outputs(up, images, tokens)):
            assert (a - b).abs().max().item() < 1e-5, mode
    dense.eval()


@pytest.mark.parametrize("k,every", [(2, 2), (2, 1), (3, 3)])
def test_upcycled_vit_b32_equals_dense(dense_b32, k, every):
    up = clipmoe.upcycle(dense_b32, num_experts=4, top_k=k, every=every)
    moe_blocks = [i for i, b in enumerate(up.image.blocks) if isinstance(b.mlp, MoE)]
    assert moe_blocks == [i for i in range(12) if i % every == every - 1]
    assert all(isinstance(b.mlp, MoE) == (i in moe_blocks) for i, b in enumerate(up.text.blocks))
    _check_identity(dense_b32, up, 224, 77)


@pytest.mark.parametrize("kwargs", [
    {"top_k": 1},  # straight-through gate: value 1
    {"top_k": 2, "batch_priority": True},
    {"top_k": 2, "capacity_factor": 4.0, "eval_capacity_factor": 4.0, "min_capacity": 10_000},
    {"router": "expert_choice", "capacity_factor": 4.0, "eval_capacity_factor": 4.0},  # C = N: nothing dropped
    {"router": "expert_choice"},  # dropless (the default None) expert choice is C = N too
    {"top_k": 2, "shared_expert": True},  # the shared expert starts with a zero output
    {"router": "expert_choice", "eval_router": "topk", "top_k": 4},  # eval: all 4 experts, raw probabilities sum to 1
    {"top_k": 2, "per_block": {0: {"top_k": 1}, 1: {"router": "expert_choice"}, 3: {"num_experts": 2}}},  # per layer
])
def test_every_non_dropping_mode_equals_dense(kwargs):
    dense = clipmoe.create_model("clipmoe-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these modes is warned about
        up = clipmoe.upcycle(dense, num_experts=4, every=1, **kwargs)
    _check_identity(dense, up, 64, 32)


def test_expert_choice_eval_router_topk_below_num_experts_warns_and_scales_by_k_over_e():
    """Evaluated as token choice, an expert-choice layer weighs a token's top_k experts by their raw probabilities
    (as its training does): from the zero router, top_k / num_experts of the dense MLP's output. Said, not hidden."""
    dense = clipmoe.create_model("clipmoe-tiny")
    with pytest.warns(UserWarning, match="eval_router='topk' with top_k=2 < num_experts=4"):
        up = clipmoe.upcycle(dense, num_experts=4, top_k=2, every=1, towers="text", router="expert_choice",
                             eval_router="topk")
    block = up.text.blocks[0]
    x = torch.randn(5, 7, dense.text.blocks[0].mlp.fc1.in_features)
    with torch.no_grad():
        torch.testing.assert_close(block.mlp.train()(x)[0], dense.text.blocks[0].mlp(x)[0])  # training: C = N, equal
        torch.testing.assert_close(block.mlp.eval()(x)[0], 0.5 * dense.text.blocks[0].mlp(x)[0])


def test_upcycle_keeps_the_source_dtype():
    """The upcycled model is in its source's dtype: a float64 model stays float64 (router and all), and equals
    its source to float64 rounding; a bf16 model stays bf16."""
    dense = clipmoe.create_model("clipmoe-tiny").double()
    for kwargs in ({"top_k": 2}, {"top_k": 1}, {"router": "expert_choice"}):
        up = clipmoe.upcycle(dense, num_experts=4, every=1, **kwargs).eval()
        assert {p.dtype for p in up.parameters()} == {torch.float64}
        images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        tokens = clipmoe.get_tokenizer(dense)(["a red square", ""])
        for a, b in zip(_outputs(dense.eval(), images, tokens), _outputs(up, images, tokens)):
            assert a.dtype == b.dtype == torch.float64 and (a - b).abs().max().item() < 1e-12
    bf16 = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro").bfloat16(), num_experts=2, every=1, noise_std=0.01)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_expert_choice_with_eval_router_topk_gives_batch_independent_embeddings():
    with pytest.warns(UserWarning, match="eval_router='topk'"):
        up = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, every=1, router="expert_choice",
                             capacity_factor=1.0, eval_router="topk", noise_std=0.2)
    assert up.config.text.moe.eval_router == "topk"
    with torch.no_grad():
        for m in up.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    up.eval()
    tokenizer = clipmoe.get_tokenizer(up)
    batch = up.encode_text(tokenizer(["a red square", "two blue circles", "x"]))
    alone = up.encode_text(tokenizer(["two blue circles"]))
    torch.testing.assert_close(alone[0], batch[1], atol=1e-6, rtol=1e-6)


def test_drop_upcycling_reinitialises_a_fraction():
    dense = clipmoe.create_model("clipmoe-micro")
    up = clipmoe.upcycle(dense, num_experts=3, every=1, reinit_fraction=0.5)
    w1, fc1 = up.image.blocks[0].mlp.experts.w1, dense.image.blocks[0].mlp.fc1.weight
    F_ = fc1.shape[0]
    changed = [(w1[e] != fc1.t()).any(dim=0) for e in range(3)]  # hidden units (columns) re-drawn
    assert all(int(c.sum()) == F_ // 2 for c in changed)
    w2, fc2 = up.image.blocks[0].mlp.experts.w2, dense.image.blocks[0].mlp.fc2.weight
    assert all(torch.equal((w2[e] != fc2).any(dim=0), changed[e]) for e in range(3))  # the same units
    assert not torch.equal(changed[0], changed[1]) or not torch.equal(changed[1], changed[2])


def test_upcycle_open_clip_checkpoint(tmp_path):
    import open_clip

    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    torch.save(ref.state_dict(), tmp_path / "b32.bin")
    up = clipmoe.upcycle(tmp_path / "b32.bin", arch="ViT-B-32", num_experts=2, every=6)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (up.eval().encode_image(images) - ref.encode_image(images)).abs().max() < 1e-5
    # the open_clip model itself, or its state dict; the model's activation wins over the name's "-quickgelu"
    from_model = clipmoe.upcycle(ref, arch="ViT-B-32-quickgelu", num_experts=2, top_k=1, every=6)
    from_state = clipmoe.upcycle(ref.state_dict(), arch="ViT-B-32", num_experts=2, every=12)
    with pytest.warns(UserWarning, match=r"QuickGELU weights .* need arch='ViT-B-32-quickgelu'"):
        assert clipmoe.upcycle(ref.state_dict(), num_experts=2, every=12).config == from_state.config
    assert not from_model.config.quick_gelu and not from_model.training
    with torch.no_grad():
        for up in (from_model, from_state):
            assert (up.eval().encode_image(images) - ref.encode_image(images)).abs().max() < 1e-5
    wrapped = torch.nn.Module()  # what DistributedDataParallel looks like from here: the model at .module
    wrapped.module = clipmoe.create_model("clipmoe-micro")
    assert isinstance(clipmoe.upcycle(wrapped, num_experts=2, every=1).image.blocks[0].mlp, MoE)
    for bad, match in [(3, "not int"), (tmp_path / "none.bin", "not found"),
                       ("ViT-B-32", r"not found.*create_model\('ViT-B-32'")]:
        with pytest.raises(clipmoe.ClipmoeError, match=match):
            clipmoe.upcycle(bad)


def _open_clip_clip(vision: dict, text: dict, quick_gelu: bool = False):
    """A small open_clip CLIP with non-zero biases and gains everywhere, so no misplaced weight goes unnoticed."""
    import open_clip

    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_upcycle_reads_the_architecture_from_open_clip_weights(tmp_path):
    torch.manual_seed(0)
    micro = ({"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},  # clipmoe-micro
             {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2})
    ref = _open_clip_clip(*micro, quick_gelu=True)
    images = torch.randn(2, 3, 16, 16)
    tokens = clipmoe.get_tokenizer("clipmoe-micro")(["a photo of a cat", "two dogs"])

    def same_as(up, ref):
        with torch.no_grad():
            return max((up.eval().encode_image(images) - ref.encode_image(images)).abs().max(),
                       (up.encode_text(tokens) - ref.encode_text(tokens)).abs().max()) < 1e-5

    kw = {"num_experts": 2, "top_k": 2, "every": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model says its heads and activation: nothing to warn about
        from_model = clipmoe.upcycle(ref, **kw)
    assert from_model.config.quick_gelu and same_as(from_model, ref)
    # OpenAI's TorchScript archives are QuickGELU models
    torch.jit.trace_module(ref, {"encode_image": images[:1]}, check_trace=False).save(str(tmp_path / "m.pt"))
    assert same_as(clipmoe.upcycle(tmp_path / "m.pt", **kw), ref)
    # a state dict file does not say: GELU, open_clip's default, with a warning that says what to do
    torch.save(ref.state_dict(), tmp_path / "m.bin")
    with pytest.warns(UserWarning,
                      match=r"m.bin: .*taken to be GELU.*create_model\('clipmoe-micro', .*quick_gelu=True"):
        from_file = clipmoe.upcycle(tmp_path / "m.bin", **kw)
    assert from_file.config.name == "clipmoe-micro" and not from_file.config.quick_gelu
    assert not same_as(from_file, ref)
    quick = clipmoe.create_model("clipmoe-micro", pretrained=str(tmp_path / "m.bin"), quick_gelu=True)
    assert same_as(clipmoe.upcycle(quick, **kw), ref)
    # shapes no architecture has: heads from the open_clip model (4 and 2 where width / 64 = 1) ...
    odd = _open_clip_clip({**micro[0], "width": 64}, {**micro[1], "width": 64, "layers": 3})
    up = clipmoe.upcycle(odd, **kw)
    assert (up.config.name, up.config.vision.num_heads, up.config.text.num_heads, up.config.text.depth) == ("", 4, 2, 3)
    assert same_as(up, odd)
    wrapped = torch.nn.Module()  # as DistributedDataParallel holds it: keys and module names under "module."
    wrapped.module = odd
    assert clipmoe.upcycle(wrapped, **kw).config == up.config
    # ... or, from a state dict, heads of width 64
    with pytest.warns(UserWarning, match=r"need upcycling clipmoe.create_model\('ARCH'"):
        up = clipmoe.upcycle(odd.state_dict(), **kw)
    assert (up.config.vision.num_heads, up.config.text.num_heads) == (1, 1)
    # weights that are not a ViT CLIP say so
    with pytest.raises(clipmoe.ClipmoeError, match=r"state dict given: .*no 'text.token_embed.weight'.*"
                                                   r"upcycles open_clip's ViT CLIPs"):
        clipmoe.upcycle({k: v for k, v in clipmoe.create_model("clipmoe-micro").state_dict().items()
                         if not k.startswith("text.token")})
    # ... and an open_clip model of another image tower names it
    rn = _open_clip_clip({"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}, micro[1])  # an RN50 in miniature
    with pytest.raises(clipmoe.ClipmoeError, match=r"^the CLIP given \(image tower ModifiedResNet\): .*ViT CLIPs"):
        clipmoe.upcycle(rn, **kw)


def test_experts_are_copies_and_router_zero():
    dense = clipmoe.create_model("clipmoe-micro")
    up = clipmoe.upcycle(dense, num_experts=3, top_k=2, every=1, towers=("text",))
    assert not any(isinstance(b.mlp, MoE) for b in up.image.blocks)
    for db, ub in zip(dense.text.blocks, up.text.blocks):
        assert torch.count_nonzero(ub.mlp.router.weight) == 0
        for e in range(3):
            assert torch.equal(ub.mlp.experts.w1[e], db.mlp.fc1.weight.t())
            assert torch.equal(ub.mlp.experts.w2[e], db.mlp.fc2.weight)
            assert torch.equal(ub.mlp.experts.b2[e], db.mlp.fc2.bias)
    # the source model is untouched and the upcycled one trains
    assert not any(isinstance(m, MoE) for m in dense.modules())
    out = up.train()(torch.randn(2, 3, 16, 16), clipmoe.get_tokenizer(up)(["a", "b"]))
    assert len(out.aux) == 2 and all(a.tower == "text" for a in out.aux)


def test_noise_breaks_symmetry():
    up = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2, every=1, noise_std=0.01)
    w1 = up.image.blocks[0].mlp.experts.w1
    assert not torch.equal(w1[0], w1[1])


def test_upcycle_rejects_bad_towers_and_moe_source():
    dense = clipmoe.create_model("clipmoe-micro")
    with pytest.raises(clipmoe.ClipmoeError, match="towers"):
        clipmoe.upcycle(dense, towers=("audio",))
    with pytest.raises(clipmoe.ClipmoeError, match="already has MoE"):
        clipmoe.upcycle(clipmoe.upcycle(dense, num_experts=2), num_experts=2)
    # one tower by name, not its letters
    image_only = clipmoe.upcycle(dense, num_experts=2, towers="image")
    assert image_only.config.vision.moe is not None and image_only.config.text.moe is None
    with pytest.raises(clipmoe.ClipmoeError, match="towers"):
        clipmoe.upcycle(dense, towers=())
    with pytest.raises(clipmoe.ConfigError, match=r"noise_std: -0.1 must be >= 0"):
        clipmoe.upcycle(dense, noise_std=-0.1)
    with pytest.raises(clipmoe.ConfigError, match=r"reinit_fraction: 1.5 must be in \[0, 1\]"):
        clipmoe.upcycle(dense, reinit_fraction=1.5)


def test_dense_pretrained_under_moe_overrides_is_upcycled(tmp_path):
    from clipmoe.config import ModelSection, from_dict

    torch.manual_seed(0)
    dense = clipmoe.create_model("clipmoe-micro")
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    open_clip_file = clipmoe.save_open_clip(dense, tmp_path / "dense_open_clip.safetensors")
    moe = {"num_experts": 3, "top_k": 2, "every": 1, "capacity_factor": None}
    for source in (tmp_path / "dense.pt", open_clip_file):
        up = clipmoe.create_model("clipmoe-micro", pretrained=str(source), vision={"moe": moe}, text={"moe": moe})
        assert isinstance(up.image.blocks[0].mlp, MoE) and isinstance(up.text.blocks[1].mlp, MoE)
        _check_identity(dense, up, 16, 16)
    # a run config's model section: a shared expert starts with a zero output, so the model is still the same
    section = {"arch": "clipmoe-micro", "pretrained": str(tmp_path / "dense.pt"),
               "overrides": {"vision": {"moe": {**moe, "shared_expert": True}}}}
    up = clipmoe.create_model(from_dict(ModelSection, section))
    assert torch.equal(up.image.blocks[0].mlp.shared.fc1.weight, dense.image.blocks[0].mlp.fc1.weight)
    _check_identity(dense, up, 16, 16)
    noisy = clipmoe.create_model(from_dict(ModelSection, {**section, "upcycle": {"noise_std": 0.1, "seed": 1}}))
    w1 = noisy.image.blocks[0].mlp.experts.w1
    assert not torch.equal(w1[0], w1[1])
    with pytest.warns(UserWarning, match="no effect"):  # nothing to upcycle: said, not silently ignored
        clipmoe.create_model(from_dict(ModelSection, {"arch": "clipmoe-micro", "upcycle": {"reinit_fraction": 0.5}}))
    with pytest.raises(clipmoe.ClipmoeError, match="hidden width"):
        clipmoe.create_model("clipmoe-micro", pretrained=str(tmp_path / "dense.pt"),
                             vision={"moe": {**moe, "expert_mlp_ratio": 2.0}})


def test_per_block_settings_of_one_tower_upcycle_it_alone():
    """Towers of different depths: a block of the deeper tower named in per_block is an error that names the tower
    and the way out, upcycling the towers one at a time."""
    dense = clipmoe.create_model("clipmoe-micro", vision={"depth": 4})
    with pytest.raises(clipmoe.ConfigError, match=r"^the text tower: moe.per_block: \[3\] names blocks without an MoE "
                                                  r"layer \(this tower's: \[0, 1\]\); .* towers one at a time"):
        clipmoe.upcycle(dense, every=1, per_block={3: {"top_k": 1}})
    image = clipmoe.upcycle(dense, every=1, towers="image", per_block={3: {"top_k": 1}})
    both = clipmoe.upcycle(image, every=1, towers="text")
    assert [b.mlp.cfg.top_k for b in both.image.blocks] == [2, 2, 2, 1]
    assert [b.mlp.cfg.top_k for b in both.text.blocks] == [2, 2]
    _check_identity(dense, both, 16, 16)
