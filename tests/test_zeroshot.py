"""zeroshot.build_classifier against open_clip's build_zero_shot_classifier on the same weights, and the
metrics against hand-computed values."""
import open_clip
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

import clipmoe
import zeroshot


def test_classifier_matches_open_clip():
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = clipmoe.create_model("ViT-B-32")
    from clipmoe.checkpoint import load_weights

    load_weights(model, ref.state_dict(), "open_clip model")
    classnames, templates = IMAGENET_CLASSNAMES[:12], SIMPLE_IMAGENET_TEMPLATES
    with torch.no_grad():
        theirs = open_clip.build_zero_shot_classifier(ref, open_clip.get_tokenizer("ViT-B-32"), classnames, templates)
        ours = zeroshot.build_classifier(model.encode_text, clipmoe.get_tokenizer(model), classnames, templates,
                                         batch_size=7)
    assert ours.shape == theirs.shape == (512, 12)
    assert (torch.nn.functional.cosine_similarity(ours, theirs, dim=0) >= 0.99999).all()


def test_string_templates_and_per_class_prompts():
    def enc(tokens):  # a fake encoder: one-hot of the first word id, so prompts are easy to reason about
        return torch.nn.functional.one_hot(tokens[:, 1] % 16, 16).float()

    tok = clipmoe.get_tokenizer("clipmoe-micro")
    w = zeroshot.build_classifier(enc, tok, ["cat", "dog"], ["{c}", "a {}"])
    assert w.shape == (16, 2) and torch.allclose(w.norm(dim=0), torch.ones(2))
    w2 = zeroshot.build_classifier(enc, tok, ["cat", "dog"], {"cat": ["cat"], "dog": ["dog", "dog"]})
    assert torch.allclose(w2.norm(dim=0), torch.ones(2))


def test_metrics_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    m = zeroshot.classification_metrics(logits, labels)
    assert m["top1"] == 0.5  # rows 0 and 2
    assert m["top5"] is None  # fewer than 5 classes: CLIP_benchmark reports NaN
    assert zeroshot.topk_accuracy(logits, labels, 5) == 1.0
    # per class: class 0 1/1, class 1 0/1, class 2 1/2 -> mean 0.5
    assert abs(m["mean_per_class_recall"] - 0.5) < 1e-9
    assert zeroshot.topk_accuracy(logits, labels, 2) == 1.0


# --- metadata -------------------------------------------------------------------------------------------

def test_metadata_covers_the_benchmark_suites():
    names = zeroshot.list_datasets("classification")
    assert len(names) >= 35
    clip_suite = ["food101", "cifar10", "cifar100", "sun397", "cars", "fgvc_aircraft", "voc2007", "dtd", "pets",
                  "caltech101", "flowers", "mnist", "fer2013", "stl10", "eurosat", "resisc45", "gtsrb",
                  "kitti_closest_vehicle_distance", "country211", "pcam", "clevr_count_all", "renderedsst2",
                  "imagenet1k", "birdsnap", "ucf101", "hateful_memes"]
    family = ["imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o", "objectnet"]
    vtab_wilds = ["clevr_closest_object_distance", "dsprites_label_orientation", "dsprites_label_x_position",
                  "smallnorb_label_azimuth", "smallnorb_label_elevation", "dmlab", "diabetic_retinopathy", "svhn",
                  "wilds/iwildcam", "wilds/fmow", "wilds/camelyon17", "dollar_street", "geode"]
    assert set(clip_suite + family + vtab_wilds) <= set(names)
    sizes = {"cifar10": 10, "cifar100": 100, "food101": 101, "sun397": 397, "cars": 196, "fgvc_aircraft": 100,
             "dtd": 47, "pets": 37, "flowers": 102, "country211": 211, "gtsrb": 43, "eurosat": 10, "resisc45": 45,
             "mnist": 10, "stl10": 10, "fer2013": 7, "pcam": 2, "renderedsst2": 2, "voc2007": 20, "svhn": 10,
             "imagenet1k": 1000, "imagenet-a": 200, "imagenet-r": 200, "imagenet-o": 200, "imagenetv2": 1000,
             "clevr_count_all": 8, "smallnorb_label_azimuth": 18, "dsprites_label_orientation": 40,
             "wilds/fmow": 62, "kitti_closest_vehicle_distance": 4, "diabetic_retinopathy": 5, "dmlab": 6,
             "birdsnap": 500, "ucf101": 101, "hateful_memes": 2}
    for name, n in sizes.items():
        assert len(zeroshot.classnames(name)) == n, name
    for name in names:
        if name in zeroshot.metadata.NAMES_FROM_DATA:
            continue
        ts = zeroshot.templates(name)
        assert ts and all("{c}" in t for t in ts), name
        blank = [c for c in zeroshot.classnames(name) if not c.strip()]
        # CLIP_benchmark's CLEVR distance names have one empty name (the prompt is then " shapes."): kept verbatim
        assert not blank or name == "clevr_closest_object_distance", name


def test_openai_only_lists_keep_sorted_folder_order():
    # UCF101's labels are its sorted class folders (ApplyEyeMakeup, ...); Birdsnap's list is alphabetical
    folders = [n.replace(" ", "") for n in zeroshot.classnames("ucf101")]
    assert folders == sorted(folders) and folders[0] == "ApplyEyeMakeup"
    assert zeroshot.classnames("birdsnap") == sorted(zeroshot.classnames("birdsnap"))
    assert len(zeroshot.templates("ucf101")) == 48
    assert zeroshot.classnames("HatefulMemes") == ["meme", "hatespeech meme"]


def test_imagenet_metadata_is_openais():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert zeroshot.classnames("imagenet1k") == list(IMAGENET_CLASSNAMES)
    assert zeroshot.templates("imagenet1k") == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(zeroshot.templates("imagenet1k")) == 80
    assert zeroshot.classnames("wds/imagenetv2") == list(IMAGENET_CLASSNAMES)


def test_imagenet_subsets_match_timms_synset_lists():
    # an independent source: timm ships the ImageNet-A/R WordNet ids
    import importlib.resources

    wnids = zeroshot.metadata.imagenet_wnids()
    assert wnids == importlib.resources.files("timm").joinpath("data/_info/imagenet_synsets.txt").read_text().split()
    for name, file in (("imagenet-a", "imagenet_a_synsets.txt"), ("imagenet-r", "imagenet_r_synsets.txt")):
        subset = set(importlib.resources.files("timm").joinpath("data/_info", file).read_text().split())
        expected = [IMAGENET_CLASSNAMES[i] for i, w in enumerate(wnids) if w in subset]
        assert zeroshot.classnames(name) == expected


def test_names_and_aliases():
    assert zeroshot.canonical_name("wds/vtab/cifar10") == "cifar10"
    assert zeroshot.canonical_name("wds_vtab-smallnorb_label_azimuth") == "smallnorb_label_azimuth"
    assert zeroshot.canonical_name("wds/wilds/fmow") == "wilds/fmow"
    assert zeroshot.canonical_name("vtab/caltech101") == "caltech101_vtab"
    assert zeroshot.canonical_name("ImageNet") == "imagenet1k"
    try:
        zeroshot.classnames("no-such-set")
    except zeroshot.UnknownDataset as e:
        assert "no-such-set" in str(e) and "cifar10" in str(e)
    else:
        raise AssertionError("unknown dataset accepted")
    try:
        zeroshot.classnames("objectnet")
    except zeroshot.UnknownDataset as e:
        assert "classnames.txt" in str(e)
    assert len(zeroshot.templates("objectnet")) == 80


def test_user_classnames_and_templates_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\n dog \n")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na {} drawing\n")
    (tmp_path / "cupl.json").write_text('{"cat": ["a furry cat"], "dog": ["a dog", "a good dog"]}')
    (tmp_path / "bad.json").write_text('{"cat": 3}')
    assert zeroshot.read_classnames(tmp_path / "names.txt") == ["cat", "dog"]
    assert zeroshot.read_classnames(tmp_path / "names.txt", keep_blank=True) == ["cat", "", "dog"]
    assert zeroshot.read_templates(tmp_path / "t.txt") == ["a photo of a {c}.", "a {} drawing"]
    assert zeroshot.read_templates(tmp_path / "cupl.json")["dog"] == ["a dog", "a good dog"]
    import pytest

    with pytest.raises(ValueError, match="bad.json"):
        zeroshot.read_templates(tmp_path / "bad.json")
    # a template must take the class name: not a bare sentence, nor a field of another name (a KeyError at the
    # first class, in the middle of an evaluation)
    for bad in ("a photo of {x}", "a photo", "a {0} and {1}"):
        (tmp_path / "bad.txt").write_text(f"a photo of a {{c}}.\n{bad}\n")
        with pytest.raises(ValueError, match=r"bad.txt: template .* has no \{c\} \(or \{\}\)"):
            zeroshot.read_templates(tmp_path / "bad.txt")
    (tmp_path / "ok.json").write_text('["{c}, {c}", "a {} drawing", "{c} in {braces}"]')
    assert len(zeroshot.read_templates(tmp_path / "ok.json")) == 3
    assert zeroshot.fill("a {} drawing", "cat") == "a cat drawing"


# --- classifier speed paths and cache -------------------------------------------------------------------

def _naive_classifier(model, tok, classnames, templates):
    out = []
    for c in classnames:
        f = torch.nn.functional.normalize(model.encode_text(tok([t.replace("{c}", c) for t in templates])), dim=-1)
        out.append(torch.nn.functional.normalize(f.mean(0), dim=-1))
    return torch.stack(out, dim=1)


def test_length_sorted_batches_equal_per_class_encoding():
    torch.manual_seed(0)
    model = clipmoe.create_model("clipmoe-micro").eval()
    tok = clipmoe.get_tokenizer(model)
    names = ["cat", "a very long class name with many words in it", "dog"]
    templates = zeroshot.templates("cifar10")
    with torch.no_grad():
        ref = _naive_classifier(model, tok, names, templates)
        ours = zeroshot.build_classifier(model.encode_text, tok, names, templates, batch_size=5)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_classifier_cache(tmp_path):
    calls = []

    def enc(tokens):
        calls.append(len(tokens))
        return torch.nn.functional.one_hot(tokens[:, 1] % 16, 16).float()

    tok = clipmoe.get_tokenizer("clipmoe-micro")
    kw = dict(cache_dir=tmp_path, model_key="m1")
    a = zeroshot.build_classifier(enc, tok, ["cat", "dog"], ["{c}", "a {c}"], **kw)
    n = len(calls)
    b = zeroshot.build_classifier(enc, tok, ["cat", "dog"], ["{c}", "a {c}"], **kw)
    assert len(calls) == n and torch.equal(a, b)  # read back, not recomputed
    zeroshot.build_classifier(enc, tok, ["cat", "dog"], ["{c}"], **kw)
    zeroshot.build_classifier(enc, tok, ["cat", "dog"], ["{c}", "a {c}"], cache_dir=tmp_path, model_key="m2")
    assert len(calls) > n and len(list(tmp_path.glob("*.pt"))) == 3
    model = clipmoe.create_model("clipmoe-micro")
    key = zeroshot.fingerprint(model)
    assert key == zeroshot.fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert key != zeroshot.fingerprint(model)


# --- multilabel and retrieval metrics -------------------------------------------------------------------

def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.1, 0.2]])
    targets = torch.tensor([[1, -1], [0, 1], [1, 1], [-1, 0]])
    ap = zeroshot.average_precision(scores, targets)
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2 ; class 1: ranks 1 (0.7) and 2 (0.6) -> 1
    assert abs(ap[0].item() - (1 + 2 / 3) / 2) < 1e-6 and abs(ap[1].item() - 1.0) < 1e-6
    mean_ap = zeroshot.multilabel_metrics(scores, targets)["mean_average_precision"]
    assert abs(mean_ap - ((1 + 2 / 3) / 2 + 1) / 2) < 1e-6


def test_retrieval_recall_by_hand():
    images = torch.eye(3)
    # captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2 (but it looks like image 0)
    texts = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [1.0, 0, 0.5]])
    m = zeroshot.retrieval_metrics(images, texts, [0, 0, 1, 2], ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.75  # caption 3 finds image 0 first
    assert m["image_retrieval_recall@2"] == 1.0
    # image 0: best caption 0 (own); image 1: caption 2 (own); image 2: caption 3 (own, 0.5 beats 0)
    assert m["text_retrieval_recall@1"] == 1.0
    # scored a chunk of rows at a time: the same recalls as a brute-force count over the full score matrix
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(50, 8, generator=g), torch.randn(120, 8, generator=g)
    t2i = torch.randint(0, 50, (120,), generator=g)
    chunked = zeroshot.retrieval_metrics(images, texts, t2i.tolist(), chunk=7)
    scores = texts @ images.T
    for k in (1, 5, 10):
        rank_of_own = (scores > scores.gather(1, t2i[:, None])).sum(1)  # images closer than a caption's own
        assert chunked[f"image_retrieval_recall@{k}"] == (rank_of_own < k).float().mean().item()
        best_own = torch.stack([scores[t2i == i, i].max() if (t2i == i).any() else torch.tensor(-1e9)
                                for i in range(50)])
        closer = (scores.T > best_own[:, None]).sum(1)  # captions closer than an image's best own caption
        assert chunked[f"text_retrieval_recall@{k}"] == (closer < k).float().mean().item()


def test_text_tower_trims_padding_exactly():
    # a short prompt encoded alone (trimmed to its own length) equals it beside a long one (padded)
    torch.manual_seed(0)
    model = clipmoe.create_model("ViT-B-32").eval()
    tok = clipmoe.get_tokenizer(model)
    long = "a photo of " + "a very long and winding description " * 6
    with torch.no_grad():
        alone = model.encode_text(tok(["a cat"]))
        beside = model.encode_text(tok(["a cat", long]))[:1]
    assert torch.allclose(alone, beside, atol=1e-5)
