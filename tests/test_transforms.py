"""The fast training transform: torchvision's crop distribution and fallback, PIL's bicubic within one grey
level, open_clip's normalisation, and uint8 batches from the loader."""
import random

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

import loaders
from loaders.transforms import OPENAI_MEAN, OPENAI_STD, TrainTransform, crop_box, normalize_batch


def _photo(w=256, h=256, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))


def test_crop_boxes_follow_random_resized_crop():
    rng = random.Random(0)
    for _ in range(2000):
        left, top, right, bottom = crop_box(256, 200, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 256 and bottom <= 200
        assert 0.88 <= w * h / (256 * 200) <= 1.0 and 0.74 <= w / h <= 1.35
    # impossible aspect ratios: the same deterministic central fallback as torchvision
    for size in ((1000, 10), (10, 1000)):
        img = Image.new("RGB", size)
        top, left, h, w = RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3])
        assert crop_box(*size, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (left, top, left + w, top + h)


def test_resize_within_one_grey_level_of_pil_and_normalisation_of_open_clip():
    img = _photo()
    tf = TrainTransform(224, seed=3)
    out = tf(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    box = crop_box(256, 256, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(3))
    # torchvision's resized_crop on PIL: crop, then bicubic resize
    ref = torch.from_numpy(np.array(img.crop(box).resize((224, 224), Image.BICUBIC))).permute(2, 0, 1)
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05
    norm = open_clip.image_transform(224, is_train=False).transforms[-1]
    assert torch.allclose(normalize_batch(out), norm(TF.to_tensor(TF.to_pil_image(out))), atol=1e-5)
    assert torch.equal(TrainTransform(224, seed=3)(img), out)  # seeded: reproducible
    f32 = TrainTransform(224, seed=3, normalize=True)(img)
    assert f32.dtype == torch.float32 and torch.allclose(f32, normalize_batch(out), atol=1e-6)
    assert normalize_batch(f32) is f32
    assert OPENAI_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN) and OPENAI_STD == tuple(open_clip.OPENAI_DATASET_STD)


def test_pickles_for_spawned_workers():
    import pickle

    for tf in (TrainTransform(32), TrainTransform(32, seed=1)):
        assert pickle.loads(pickle.dumps(tf))(_photo(40, 40)).shape == (3, 32, 32)


def test_grey_and_rgba_images(tiny_shards):
    assert TrainTransform(32)(Image.new("L", (50, 40), 7)).shape == (3, 32, 32)
    assert TrainTransform(32)(Image.new("RGBA", (50, 40))).shape == (3, 32, 32)
    batch = next(iter(loaders.image_text_loader(tiny_shards["train"], batch_size=8, transform=TrainTransform(16),
                                                tokenize=open_clip.get_tokenizer("ViT-B-32"))))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)
