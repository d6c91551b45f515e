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
    assert m["top5"] == 1.0
    # per class: class 0 1/1, class 1 0/1, class 2 1/2 -> mean 0.5
    assert abs(m["mean_per_class_recall"] - 0.5) < 1e-9
    assert zeroshot.topk_accuracy(logits, labels, 2) == 1.0
