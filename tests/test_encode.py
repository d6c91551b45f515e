"""clipmoe.encode_text / encode_image: normalised float32 rows in input order, batched, cached."""
import pytest
import torch
from PIL import Image

import clipmoe
from clipmoe import encode
from loaders import synthetic


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, top_k=2, noise_std=0.1)
    with torch.no_grad():
        for b in model.text.blocks[1::2]:
            b.mlp.router.weight.normal_()  # a trained-looking router, so routing matters
    return model, clipmoe.save(model, tmp_path_factory.mktemp("m") / "m.safetensors")


TEXTS = ["a red square", "three blue circles on the left", "", "a cat <end_of_text> sat", "x" * 5000, "ünï"]


def test_encode_text_order_norm_and_batching(saved):
    model, path = saved
    full = clipmoe.encode_text(TEXTS, model=path, batch_size=4)
    assert full.shape == (len(TEXTS), model.config.embed_dim) and full.dtype == torch.float32
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(len(TEXTS)))
    one_by_one = torch.cat([clipmoe.encode_text([t], model=path, batch_size=1) for t in TEXTS])
    torch.testing.assert_close(full, one_by_one, atol=1e-5, rtol=1e-5)
    reversed_ = clipmoe.encode_text(TEXTS[::-1], model=model, batch_size=3)
    torch.testing.assert_close(reversed_.flip(0), full, atol=1e-5, rtol=1e-5)
    # against the model's own call
    tokens = clipmoe.get_tokenizer(model)(TEXTS)
    with torch.no_grad():
        direct = model.eval().encode_text(tokens, normalize=True)
    torch.testing.assert_close(full, direct, atol=1e-5, rtol=1e-5)


def test_progress_bar_only_when_asked(saved, capsys):
    _, path = saved
    quiet = clipmoe.encode_text(TEXTS, model=path, batch_size=4)
    assert capsys.readouterr().err == ""  # inside applications: nothing on the terminal
    shown = clipmoe.encode_text(TEXTS, model=path, batch_size=4, progress=True)
    assert "encode: 100%" in capsys.readouterr().err and torch.equal(quiet, shown)
    clipmoe.encode_image(torch.zeros(3, 3, 16, 16), model=path, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_model_cached_between_calls(saved):
    _, path = saved
    assert encode.resolve_model(path) is encode.resolve_model(str(path))


def test_encode_image_paths_pil_and_tensors(saved, tmp_path):
    model, path = saved
    images = [s["image"] for s in synthetic.scenes(5, 3, image_size=32)]
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        im.save(files[-1])
    from_files = clipmoe.encode_image(files, model=path, batch_size=2)
    from_pil = clipmoe.encode_image(images, model=path)
    torch.testing.assert_close(from_files, from_pil)
    torch.testing.assert_close(from_files.norm(dim=-1), torch.ones(5))
    _, eval_tf = clipmoe.create_transforms(model.config)
    stacked = torch.stack([eval_tf(im) for im in images])
    torch.testing.assert_close(clipmoe.encode_image(stacked, model=model), from_pil, atol=1e-5, rtol=1e-5)
    assert clipmoe.encode_image(stacked[[4, 0]], model=model).allclose(from_pil[[4, 0]], atol=1e-5)
    # one image, as one string in encode_text: a row, not its characters / channels
    for single in (files[3], str(files[3]), images[3], stacked[3]):
        torch.testing.assert_close(clipmoe.encode_image(single, model=model), from_pil[3:4], atol=1e-5, rtol=1e-5)


def test_encode_errors(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    with pytest.raises(clipmoe.ClipmoeError, match="cannot read image"):
        clipmoe.encode_image([bad], model=path)
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(good)
    # decoded by threads a batch ahead: the error of a later batch's image is still the error, naming it
    with pytest.raises(clipmoe.ClipmoeError, match=f"^cannot read image {bad}: "):
        clipmoe.encode_image([good] * 4 + [bad, good], model=path, batch_size=2)
    with pytest.raises(clipmoe.ClipmoeError, match="model not found"):
        clipmoe.encode_text(["a"], model=tmp_path / "none.safetensors")
    with pytest.raises(clipmoe.ClipmoeError, match=r"ViT-B-32 is an architecture, not a model file: "
                                                   r"clipmoe.create_model\('ViT-B-32', pretrained=TAG_OR_FILE\)"):
        clipmoe.encode_text(["a"], model="ViT-B-32")
    with pytest.raises(clipmoe.ClipmoeError, match="strings"):
        clipmoe.encode_text(["a", 3], model=path)
    assert clipmoe.encode_text([], model=path).shape == (0, 32)
    with pytest.raises(clipmoe.ClipmoeError, match="^model: a CLIP model or a model file's path, not a list$"):
        clipmoe.encode_text(str(path), ["a"])  # the arguments swapped: not pathlib's TypeError
    for images, why in [(torch.rand(2, 1, 16, 16), r"image tensor 0 has shape \(1, 16, 16\); the model takes "
                                                   r"preprocessed \(3, 16, 16\)"),
                        ([torch.rand(3, 16, 16), torch.rand(3, 32, 32)], r"image tensor 1 has shape \(3, 32, 32\)"),
                        (torch.rand(16, 16), r"a \(3, H, W\) or \(N, 3, H, W\) tensor, not one of shape \(16, 16\)"),
                        (5, "not int")]:
        with pytest.raises(clipmoe.ClipmoeError, match=why):
            clipmoe.encode_image(images, model=path)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.bfloat16, 0.05)])
def test_models_cast_to_another_dtype_take_float32_pixels(saved, dtype, tol):
    """model.bfloat16() / .double(): encode_image, encode_text and the forward take float32 inputs (the image
    tower casts its pixels, as OpenAI CLIP does) and give what the float32 model gives, to the dtype's precision."""
    import copy

    from PIL import Image

    model, _ = saved
    cast = copy.deepcopy(model).to(dtype)
    images = [Image.new("RGB", (20, 20), (200, 30, 30)), Image.new("RGB", (24, 18), (20, 30, 220))]
    for fn, items in ((clipmoe.encode_image, images), (clipmoe.encode_text, TEXTS[:2])):
        ref, out = fn(items, model=model), fn(items, model=cast)
        assert out.dtype == torch.float32 and (out - ref).abs().max().item() < tol
    features = cast(torch.rand(2, 3, 16, 16), clipmoe.get_tokenizer(cast)(TEXTS[:2])).image_features
    assert features.dtype == dtype


def test_devices_are_checked_not_ignored(saved, tmp_path, tiny_shards):
    """A malformed device, one this machine lacks, or one other than where a given model lives: a one-line
    ClipmoeError (a model object is never moved behind the caller's back, nor silently left where it is)."""
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.device import resolve_device
    from clipmoe.errors import ClipmoeError
    from clipmoe.train import train
    from clipmoe.zeroshot_eval import zeroshot_eval

    model, path = saved
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ClipmoeError, match="unknown device 'bogus'"):
        resolve_device("bogus")
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ClipmoeError, match="CUDA"):
        resolve_device(missing)
    with pytest.raises(ClipmoeError, match="unknown device"):
        clipmoe.encode_text(["a"], model=path, device="bogus")
    elsewhere = "meta"  # a real device type the model is not on
    with pytest.raises(ClipmoeError, match="the model given is on cpu"):
        clipmoe.encode_image(torch.rand(1, 3, 16, 16), model=model, device=elsewhere)
    with pytest.raises(ClipmoeError, match="the model given is on cpu"):
        zeroshot_eval(model, ["folder"], tmp_path, device=elsewhere, progress=False)
    assert clipmoe.encode_text(["a"], model=model, device="cpu").shape == (1, model.config.embed_dim)
    cfg = from_dict(RunConfig, {"model": {"arch": "clipmoe-micro"}, "data": {"train": tiny_shards["train"]},
                                "train": {"steps": 1, "device": "bogus", "out_dir": str(tmp_path / "run")}})
    with pytest.raises(ClipmoeError, match="unknown device 'bogus'"):
        train(cfg, progress=False)
