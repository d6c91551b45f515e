"""The console script: thin, with one-line errors."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import clipmoe
import loaders
from clipmoe.moe import MoE


def wds_samples(urls):
    import webdataset as wds

    return list(wds.WebDataset(urls, shardshuffle=False))


def _run(*args, process: bool = False):
    """`clipmoe ARGS` as returncode, stdout and stderr: in this process (as `clipmoe.cli.main` runs it, without
    the ~8 s a new process spends importing torch), or with `process` as the console command itself."""
    if process:
        return subprocess.run([sys.executable, "-m", "clipmoe.cli", *args], capture_output=True, text=True, timeout=300)
    from clipmoe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, or a usage error
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_help_and_import_need_no_torch_and_names_stay_functions():
    code = """
import sys
import clipmoe
from clipmoe.cli import build_parser
build_parser().format_help()
assert "torch" not in sys.modules, "import clipmoe or the parser loaded torch"
import clipmoe.upcycle, clipmoe.zeroshot_eval  # loading a submodule must not hide the function of its name
assert callable(clipmoe.upcycle) and callable(clipmoe.zeroshot_eval)
assert all(getattr(clipmoe, name) is not None for name in clipmoe.__all__)
assert isinstance(clipmoe.create_model("clipmoe-micro"), clipmoe.CLIP)
try:
    clipmoe.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("unknown names must raise AttributeError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = _run("--help", process=True)
    assert r.returncode == 0 and "analyze-routing" in r.stdout


def test_cli_shortens_openmp_spinning_before_torch_loads_unless_the_user_set_it():
    code = """
import os, sys
from clipmoe import cli
assert "torch" not in sys.modules
assert cli.main(["train", "/nonexistent.yaml"]) == 2  # a one-line error, after the defaults were set
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # GOMP_SPINCOUNT overrides a wait policy in libgomp: a user's policy leaves it unset
    for preset, expected in (({}, "10000 None"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
                             ({"GOMP_SPINCOUNT": "0"}, "0 None")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, **preset})
        assert r.returncode == 0 and r.stdout.strip() == expected, r.stderr


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"clipmoe {version('clipmoe')}" == f"clipmoe {clipmoe.__version__}"


def test_set_takes_several_overrides_at_once_or_one_per_flag():
    from clipmoe.cli import build_parser

    for argv in (["train", "c.yaml", "--set", "a=1", "b.c=2", "--set", "d=3"],
                 ["train", "--set", "a=1", "b.c=2", "--set", "d=3", "--", "c.yaml"]):
        args = build_parser().parse_args(argv)
        assert args.config == "c.yaml" and args.set == ["a=1", "b.c=2", "d=3"]
    assert build_parser().parse_args(["quickstart", "--set", "x=1", "y=2"]).set == ["x=1", "y=2"]


def test_overrides_without_set_say_where_they_go(capsys):
    from clipmoe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "c.yaml", "train.steps=10", "optim.lr=1e-4"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "clipmoe: error: unrecognized arguments: train.steps=10 optim.lr=1e-4 (config overrides go after --set: "
        "--set train.steps=10 optim.lr=1e-4)")
    with pytest.raises(SystemExit):  # anything else: argparse's own message
        main(["encode", "--model", "m.safetensors", "--bogus"])
    assert capsys.readouterr().err.splitlines()[-1] == "clipmoe: error: unrecognized arguments: --bogus"


def test_train_prints_the_last_row_and_moe_layers(tmp_path, tiny_shards):
    from PIL import Image

    root = tmp_path / "colours"  # a folder benchmark, so the last row also carries zero-shot results
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), rgb).save(root / name / "0.png")
    moe = {"num_experts": 2, "top_k": 1, "every": 1}
    cfg = {"model": {"arch": "clipmoe-micro", "overrides": {"vision": {"moe": moe}, "text": {"moe": moe}}},
           "data": {"train": tiny_shards["train"], "batch_size": 8},
           "train": {"steps": 5, "log_every": 1, "out_dir": str(tmp_path / "run")},
           "eval": {"zeroshot": ["folder"], "data_root": str(root), "every": 0}}
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    r = _run("train", str(tmp_path / "run.yaml"), "--set", "train.steps=3")
    assert r.returncode == 0, r.stderr
    assert "step 2: lr" in r.stdout and "contrastive" in r.stdout
    assert "image.0   tokens per expert" in r.stdout and "text.1   tokens per expert" in r.stdout
    assert (tmp_path / "run" / "loss.png").is_file()


def test_upcycle_and_encode(tmp_path):
    dense = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "dense.safetensors")
    out = tmp_path / "moe.safetensors"
    r = _run("upcycle", str(dense), str(out), "--experts", "4", "--top-k", "2", "--every", "1", process=True)
    assert r.returncode == 0, r.stderr
    cfg = clipmoe.load(out).config
    assert cfg.vision.moe.num_experts == 4 and cfg.text.moe.moe_blocks(cfg.text.depth) == [0, 1]
    r = _run("encode", "--model", str(out), "--text", "a red square", "two circles")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and len(rows[0]) == 32
    expected = clipmoe.encode_text(["a red square", "two circles"], model=out)
    assert max(abs(a - b) for a, b in zip(rows[1], expected[1].tolist())) < 1e-5
    saved = tmp_path / "new" / "folder" / "text.pt"  # a folder that does not exist yet, as for every output
    r = _run("encode", "--model", str(out), "--text", "a red square", "--out", str(saved))
    assert r.returncode == 0, r.stderr
    assert torch.allclose(torch.load(saved, weights_only=True), expected[:1], atol=1e-5)


def test_upcycle_open_clip_weights_without_arch(tmp_path):
    dense = clipmoe.create_model("clipmoe-micro")
    path = clipmoe.save_open_clip(dense, tmp_path / "open_clip.bin")
    out = tmp_path / "moe.safetensors"
    r = _run("upcycle", str(path), str(out), "--experts", "2", "--every", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"clipmoe upcycle: warning: {path}: weights do not record their activation")
    assert r.stderr.count("\n") == 1
    assert clipmoe.load(out).config.name == "clipmoe-micro"
    # the same weights embed through --pretrained; given as a model file, the error names those flags
    r = _run("encode", "--model", "clipmoe-micro", "--pretrained", str(path), "--text", "a red square")
    assert r.returncode == 0, r.stderr
    expected = clipmoe.encode_text("a red square", dense)[0]
    assert max(abs(a - b) for a, b in zip(json.loads(r.stdout)[0], expected)) < 1e-5
    r = _run("encode", "--model", str(path), "--text", "a red square")
    assert r.returncode == 2 and r.stderr.endswith(f"or --model clipmoe-micro --pretrained {path}\n")
    # ... and upcycle through the same flags, with no warning: the architecture is named
    r = _run("upcycle", "--model", "clipmoe-micro", "--pretrained", str(path), "--out", str(out), "--experts", "2")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    up = clipmoe.load(out)
    assert max(abs(a - b) for a, b in zip(clipmoe.encode_text("a red square", up)[0],
                                          clipmoe.encode_text("a red square", dense)[0])) < 1e-5
    r = _run("upcycle", "--model", "clipmoe-micro", "--pretrained", str(path), "--arch", "clipmoe-micro", str(out))
    assert r.returncode == 2 and "drop --arch" in r.stderr


def test_upcycle_placement_and_capacity_flags(tmp_path):
    dense = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "dense.safetensors")
    out = tmp_path / "moe.safetensors"
    r = _run("upcycle", str(dense), str(out), "--num-experts", "2", "--blocks", "1", "--towers", "text",
             "--capacity-factor", "1.5", "--eval-capacity-factor", "2", "--min-capacity", "3", "--jitter", "0.01")
    assert r.returncode == 0, r.stderr
    cfg = clipmoe.load(out).config
    moe = cfg.text.moe
    assert cfg.vision.moe is None and moe.moe_blocks(cfg.text.depth) == [1]
    assert (moe.num_experts, moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity, moe.jitter) == (
        2, 1.5, 2.0, 3, 0.01)
    r = _run("upcycle", str(dense), str(out), "--last", "1", "--shared-expert")
    assert r.returncode == 0, r.stderr
    moe = clipmoe.load(out).config.vision.moe
    assert moe.moe_blocks(2) == [1] and moe.shared_expert
    r = _run("upcycle", str(dense), str(out), "--router", "expert_choice", "--eval-router", "topk")
    assert r.returncode == 0, r.stderr
    assert clipmoe.load(out).config.vision.moe.eval_router == "topk"
    r = _run("upcycle", str(dense), str(out), "--every", "1", "--per-block", "{0: {top_k: 1}, 1: {num_experts: 4}}")
    assert r.returncode == 0, r.stderr
    model = clipmoe.load(out)
    assert model.config.vision.moe.per_block == {0: {"top_k": 1}, 1: {"num_experts": 4}}
    assert [(b.mlp.cfg.top_k, b.mlp.cfg.num_experts) for b in model.text.blocks] == [(1, 8), (2, 4)]
    for bad, word in (("[1]", "--per-block"), ("{0: {top_k: 9}}", "per_block.0.top_k"), ("{0: [", "--per-block")):
        r = _run("upcycle", str(dense), str(tmp_path / "x.safetensors"), "--every", "1", "--per-block", bad)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and word in r.stderr, r.stderr
    r = _run("upcycle", str(dense), str(out), "--eval-router", "topk")  # token choice: nothing to switch
    assert r.returncode != 0 and "eval_router" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    for bad in (["--blocks", "7"], ["--blocks", "one"]):
        r = _run("upcycle", str(dense), str(tmp_path / "x.safetensors"), *bad)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "blocks" in r.stderr, r.stderr
    # one placement: a second one is an error naming both, not silently ignored (--every 2 is the default)
    for both in (["--every", "2", "--blocks", "1"], ["--every", "3", "--last", "1"], ["--last", "1", "--blocks", "0"]):
        r = _run("upcycle", str(dense), str(tmp_path / "x.safetensors"), *both)
        assert r.returncode == 2 and both[0] in r.stderr and both[2] in r.stderr, r.stderr
        assert not (tmp_path / "x.safetensors").exists()
    r = _run("upcycle", str(dense), str(out), "--towers", "image")
    assert r.returncode == 0, r.stderr
    assert clipmoe.load(out).config.vision.moe.every == 2
    # input and output also as --model / --out, the names the other commands use
    for i, paths in enumerate([["--model", str(dense), "--out", "{}"], [str(dense), "--out", "{}"],
                               ["--model", str(dense), "{}"]]):
        target = tmp_path / f"named{i}.safetensors"
        r = _run("upcycle", *[a.format(target) for a in paths], "--num-experts", "3")
        assert r.returncode == 0 and clipmoe.load(target).config.vision.moe.num_experts == 3, r.stderr
    for paths in ([str(dense)], ["--model", str(dense)], [str(dense), "a", "--out", "b"]):
        r = _run("upcycle", *paths)
        assert r.returncode == 2 and r.stderr == (
            "clipmoe upcycle: error: give the dense checkpoint and the file to write: clipmoe upcycle INPUT OUTPUT "
            "(or --model INPUT --out OUTPUT)\n")


def test_errors_are_one_line(tmp_path):  # in a process of its own: whatever reaches its stderr, from C too, counts
    r = _run("encode", "--model", str(tmp_path / "none.safetensors"), "--text", "x", process=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model not found" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    r = _run("upcycle", str(bad), str(tmp_path / "o.safetensors"), process=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


def test_analyze_routing_writes_heatmap_and_words(tmp_path, tiny_shards):
    from clipmoe.analysis import analyze_routing

    # block 1 with 2 experts (per_block): the heat map's rows differ in length
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, every=1, noise_std=0.1,
                            per_block={1: {"num_experts": 2}})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    report = analyze_routing(model.train(), tiny_shards["eval"], tmp_path, num_batches=2, batch_size=16)
    assert model.training  # routed in eval mode (the saved model's report below is the same), left training
    assert set(report) == {"image.0", "image.1", "text.0", "text.1"}
    for name, entry in report.items():
        assert abs(sum(entry["load"]) - 1) < 1e-5 and len(entry["load"]) == (2 if name.endswith(".1") else 3)
    words = [w for top in report["text.0"]["top_words"] for w, _, _ in top]
    assert words and all(isinstance(w, str) and w for w in words)
    for top in report["text.0"]["top_words"]:  # by the share of the word this expert took, largest first
        shares = [share for _, _, share in top]
        assert shares == sorted(shares, reverse=True) and all(0 < x <= 1 for x in shares)
    assert len(report["image.0"]["patch_map"]) == 3 and len(report["image.0"]["patch_map"][0]) == 2 * 2 + 1
    for top in report["image.0"]["top_patches"]:  # [key, patch index, probability], most probable first
        probs = [p for _, _, p in top]
        assert 0 < len(top) <= 8 and probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
        assert all(isinstance(key, str) and 0 <= pos < 2 * 2 for key, pos, _ in top)
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    # a saved model by its path, as the command takes it
    saved = clipmoe.save(model, tmp_path / "moe.safetensors")
    assert analyze_routing(str(saved), tiny_shards["eval"], tmp_path / "again", num_batches=2, batch_size=16) == report
    assert json.loads((tmp_path / "routing.json").read_text()).keys() == report.keys()
    # and through the console script
    path = clipmoe.save(model, tmp_path / "m.safetensors")
    r = _run("analyze-routing", "--model", str(path), "--data", tiny_shards["eval"], "--out", str(tmp_path / "cli"),
             "--batches", "1", "--batch-size", "8", "--top-patches", "3", "--top-words", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "routing.png").is_file() and "expert 0:" in r.stdout
    cli = json.loads((tmp_path / "cli" / "routing.json").read_text())
    assert all(len(top) <= 3 for top in cli["image.0"]["top_patches"])
    assert all(len(top) <= 2 for top in cli["text.0"]["top_words"])
    assert sum(sum(count for _, count, _ in top) for top in cli["text.0"]["top_words"]) > 0
    # the captions from a field of key.json: only shape names are routed words
    from loaders.synthetic import SHAPES
    r = _run("analyze-routing", "--model", str(path), "--data", tiny_shards["eval"], "--out", str(tmp_path / "shape"),
             "--batches", "1", "--batch-size", "16", "--caption-key", "shape")
    assert r.returncode == 0, r.stderr
    shaped = json.loads((tmp_path / "shape" / "routing.json").read_text())
    words = {w for top in shaped["text.0"]["top_words"] for w, _, _ in top}
    assert words and words <= set(SHAPES)


def test_analyze_routing_missing_shards_leave_no_folder_and_the_model_as_it_was(tmp_path):
    from clipmoe.analysis import analyze_routing

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2, every=1).train()
    with pytest.raises(loaders.DataError, match="none of the shards"):
        analyze_routing(model, str(tmp_path / "missing-{0..1}.tar"), tmp_path / "out")
    assert model.training and not (tmp_path / "out").exists()


def test_analyze_routing_names_an_expert_that_took_no_words(tmp_path, tiny_shards):
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, top_k=1, every=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):  # logits w.x, -w.x, 0: expert 2 never has the largest
                w = torch.randn_like(m.router.weight[0])
                m.router.weight.copy_(torch.stack([w, -w, torch.zeros_like(w)]))
    path = clipmoe.save(model, tmp_path / "m.safetensors")
    r = _run("analyze-routing", "--model", str(path), "--data", tiny_shards["eval"], "--out", str(tmp_path / "out"),
             "--batches", "1", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("expert 2: took no words") == 2 and "expert 0: took no words" not in r.stdout, r.stdout


def test_analyze_routing_counts_what_each_expert_computed(tmp_path, tiny_shards):
    """Expert choice: an expert takes its picks, not the tokens whose most probable expert it is. A fresh upcycle
    with dropless expert choice (C = N) has every expert compute every token: all of each word."""
    from clipmoe.analysis import analyze_routing

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, every=1, router="expert_choice")
    report = analyze_routing(model, tiny_shards["eval"], tmp_path, num_batches=1, batch_size=16)
    for entry in report.values():
        assert entry["load"] == pytest.approx([0.25] * 4)
    for top in report["text.0"]["top_words"]:  # each expert took every occurrence of every word
        assert top and all(share == 1 for _, _, share in top)
    # top-2: every token counts for both its experts (the zero router's tie: the same two for all)
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, every=1, top_k=2)
    report = analyze_routing(model, tiny_shards["eval"], tmp_path, num_batches=1, batch_size=16)
    assert sorted(report["image.0"]["load"]) == pytest.approx([0, 0, 0.5, 0.5])


def test_top_patches_are_the_most_probable_patches_each_expert_computed(tmp_path, tiny_shards):
    """Checked against the layer's own report of the same batch: its router probabilities and assignments."""
    from clipmoe.analysis import analyze_routing

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, every=1, top_k=2,
                            towers="image")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    report = analyze_routing(model, tiny_shards["eval"], tmp_path, num_batches=1, batch_size=64, top_patches=5)
    keys = [s["__key__"] for s in wds_samples(tiny_shards["eval"])]
    grid_tokens = 2 * 2 + 1
    for block in (0, 1):
        aux = model.image.blocks[block].mlp.last_aux  # this batch (the only one): all 64 samples, in order
        token_M, expert_M = aux.assignments
        prob_M = aux.probs[token_M, expert_M]
        for e, top in enumerate(report[f"image.{block}"]["top_patches"]):
            mine = (expert_M == e) & (token_M % grid_tokens != 0)  # the CLS token is no patch
            expected = sorted(((round(p, 6), keys[t // grid_tokens], t % grid_tokens - 1)
                               for p, t in zip(prob_M[mine].tolist(), token_M[mine].tolist())), reverse=True)[:5]
            assert sorted(((p, key, pos) for key, pos, p in top), reverse=True) == expected


def test_patch_pixels_are_the_patch_of_the_image():
    from clipmoe.analysis import _patch_pixels
    from clipmoe.factory import MEAN, STD

    colours = torch.randint(0, 256, (3, 3, 3))  # a 3 x 3 grid of 4-pixel patches, one colour each
    image = colours.permute(2, 0, 1).repeat_interleave(4, 1).repeat_interleave(4, 2).float() / 255
    normalised = (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    for index in range(9):
        pixels = _patch_pixels(normalised, index, 4)
        assert pixels.shape == (4, 4, 3) and (torch.from_numpy(pixels) == colours[index // 3, index % 3]).all()


def test_top_words_rank_by_the_share_an_expert_took():
    from collections import Counter

    from clipmoe.analysis import _top_words

    experts = [Counter({"a": 9, "b": 1, "c": 2, None: 50, ",": 7}), Counter({"a": 1, "b": 3})]
    # c was seen twice in all (< min_count 3), None (special tokens) and "," are not words: none is listed
    assert _top_words(experts, k=5, min_count=3) == [[["a", 9, 0.9], ["b", 1, 0.25]],
                                                     [["b", 3, 0.75], ["a", 1, 0.1]]]
    assert _top_words(experts, k=1, min_count=3) == [[["a", 9, 0.9]], [["b", 3, 0.75]]]
    # when no word reaches min_count, the floor drops to the most frequent word's count
    assert _top_words([Counter({"a": 1}), Counter({"b": 2})], k=5, min_count=3) == [[], [["b", 2, 1.0]]]


def test_words_are_whole_words_and_skipped_shards_are_reported(tmp_path, tiny_shards):
    """BPE splits "cyan" into "cy" + "an" ("an" is also a word of its own): the report must name "cyan",
    never a piece. A missing shard is skipped, and the report says so."""
    from clipmoe.analysis import analyze_routing

    tok = clipmoe.get_tokenizer("clipmoe-micro")
    ids = tok(["an unbelievably cyan circle"])[0].tolist()
    assert tok.words(ids)[:6] == [None, "an", "unbelievably", "cyan", "cyan", "circle"]
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2, every=1, top_k=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    shards = tmp_path / "shards"
    loaders.write_shards(({"key": f"{i:04d}", "image": Image.new("RGB", (16, 16), (0, 255, 255)),
                           "caption": "an unbelievably cyan circle"} for i in range(8)), shards, samples_per_shard=8)
    data = f"{tmp_path / 'missing.tar'}::{shards / '00000.tar'}"
    with pytest.warns(UserWarning, match="missing_shard"):
        report = analyze_routing(model, data, tmp_path / "out", num_batches=1, batch_size=8)
    words = {w for top in report["text.0"]["top_words"] for w, _, _ in top}
    assert words == {"an", "unbelievably", "cyan", "circle"}
    # a word's shares sum to k = 1 over the experts; its count is of tokens: "cyan" is 2 per caption
    for word, tokens in (("cyan", 16), ("an", 8)):
        entries = [e for top in report["text.0"]["top_words"] for e in top if e[0] == word]
        assert sum(share for _, _, share in entries) == pytest.approx(1)
        assert sum(count for _, count, _ in entries) == tokens
    # the console script prints the warning as one line, beside its progress bar
    r = _run("analyze-routing", "--model", str(clipmoe.save(model, tmp_path / "m.safetensors")), "--data", data,
             "--out", str(tmp_path / "cli"), "--batches", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    bar = [line for line in lines if line.startswith("routing:")]
    assert bar and bar[-1].startswith("routing: 100%|"), lines
    lines = [line for line in lines if line not in bar]
    assert len(lines) == 1 and "warning:" in lines[0] and "missing_shard" in lines[0] and "cyan" in r.stdout


def test_analyze_routing_errors_are_one_line(tmp_path):
    dense = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "dense.safetensors")
    moe = clipmoe.save(clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2, every=1),
                       tmp_path / "moe.safetensors")
    (tmp_path / "bad-0.tar").write_bytes(b"not a tar")
    cases = [(moe, str(tmp_path / "none-{0..1}.tar"), "none of the shards of"),
             (moe, str(tmp_path / "bad-0.tar"), "truncated_shard"),
             (dense, str(tmp_path / "bad-0.tar"), "no MoE layers"),
             (moe, str(tmp_path / "bad-0.tar"), "num_batches must be >= 1"),
             (moe, str(tmp_path / "bad-0.tar"), "batch_size must be >= 1")]
    for model, data, message in cases:
        flags = {"num_batches": ["--batches", "0"], "batch_size": ["--batch-size", "0"]}.get(message.split()[0], [])
        r = _run("analyze-routing", "--model", str(model), "--data", data, "--out", str(tmp_path / "out"), *flags)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_shards_from_folder_and_table_then_check(tmp_path):
    from loaders import synthetic

    src = tmp_path / "src"
    src.mkdir()
    for s in synthetic.scenes(25, 1, image_size=96):
        s["image"].save(src / f"{s['key']}.png")
        (src / f"{s['key']}.txt").write_text(s["caption"])
    (src / "broken.png").write_bytes(b"not a png")
    (src / "broken.txt").write_text("a broken image")
    (src / "uncaptioned.png").write_bytes((src / "broken.png").read_bytes())
    r = _run("shards", "--images", str(src), "--out", str(tmp_path / "out"), "--per-shard", "10",
             "--resize", "48", "--processes", "2")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 25 and len(manifest["shards"]) == 3
    # what was left out is said, one line each, not only counted in the stats files
    warned = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warned) == 2, r.stderr
    assert "1 images in" in warned[0] and "uncaptioned.png" in warned[0]
    assert "1 of 26 images could not be read" in warned[1] and "broken.png: cannot identify" in warned[1]
    assert sum(json.loads((tmp_path / "out" / f"0000{i}_stats.json").read_text())["failed_to_download"]
               for i in range(3)) == 1
    r = _run("shards", "--check", str(tmp_path / "out"))
    assert r.returncode == 0 and r.stdout.count(" ok") >= 3, r.stdout
    import loaders

    loader = loaders.image_text_loader(f"{tmp_path}/out/{{00000..00002}}.tar", batch_size=8,
                                       transform=lambda im: torch.zeros(1), tokenize=lambda t: torch.zeros(len(t), 2),
                                       shuffle=False)
    assert sum(len(b["key"]) for b in loader) == 25
    # a table of the same images, its columns named as open_clip's CsvDataset names them
    (tmp_path / "t.tsv").write_text("filepath\ttitle\n" + "".join(f"src/{p.name}\tcap {i}\n" for i, p in
                                                                   enumerate(sorted(src.glob("*.png")))))
    r = _run("shards", "--table", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "out2"), "--image-col", "filepath",
             "--caption-col", "title")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"wrote 25 samples in 1 shards to {tmp_path / 'out2'}")
    # damage: the check fails with a one-line error
    (tmp_path / "out" / "00001.tar").write_bytes(b"x" * 100)
    r = _run("shards", "--check", str(tmp_path / "out"))
    assert r.returncode == 2 and "1 of 3 shards failed" in r.stderr and "BAD  unreadable" in r.stdout
    # img2dataset's folders have no manifest: the counts of its _stats.json files, no checksums
    (tmp_path / "out" / "manifest.json").unlink()
    r = _run("shards", "--check", str(tmp_path / "out"))
    assert r.returncode == 2 and "1 of 3 shards failed" in r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["00000.tar", "00001.tar", "00002.tar"]
    assert rows[0][1] == rows[0][2] and rows[0][3:] == ["-", "ok"] and rows[1][4] == "unreadable" and rows[2][4] == "ok"
    assert sum(int(rows[i][2]) for i in (0, 2)) == 15  # 25 samples, 10 of them in the damaged shard
    (tmp_path / "out" / "00002_stats.json").write_text(f'{{"successes": {int(rows[2][2]) + 1}}}')  # one more
    r = _run("shards", "--check", str(tmp_path / "out"))
    assert r.stdout.splitlines()[3].split()[1:] == [str(int(rows[2][2]) + 1), rows[2][2], "-", "count", "mismatch"]
    # no count to compare with: a shard cut on a header boundary (a clean end to tarfile) still shows
    (tmp_path / "out" / "00002_stats.json").unlink()
    import tarfile

    shard = tmp_path / "out" / "00002.tar"
    with tarfile.open(shard) as tar:
        last_header = tar.getmembers()[-1].offset
    shard.write_bytes(shard.read_bytes()[:last_header])
    r = _run("shards", "--check", str(tmp_path / "out"))
    assert r.returncode == 2 and "2 of 3 shards failed" in r.stderr
    assert r.stdout.splitlines()[3].split()[1:] == ["-", rows[2][2], "-", "truncated"], r.stdout


def test_train_takes_a_deepspeed_config_file(tmp_path):
    """`--deepspeed-config JSON` (and the deepspeed launcher's --local_rank): a bad file, or a DeepSpeed config that
    contradicts clipmoe's, is one line before any work."""
    from clipmoe.cli import build_parser

    args = build_parser().parse_args(["train", "c.yaml", "--deepspeed_config", "ds.json", "--local_rank=1"])
    assert args.deepspeed_config == "ds.json"
    (tmp_path / "run.yaml").write_text(json.dumps({"data": {"train": "x.tar"}}))
    r = _run("train", str(tmp_path / "run.yaml"), "--deepspeed-config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text("{zero: ")
    r = _run("train", str(tmp_path / "run.yaml"), "--deepspeed-config", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    r = _run("train", str(tmp_path / "run.yaml"), "--deepspeed-config", str(tmp_path / "z3.json"))
    assert r.returncode == 2 and "stages 0, 1 and 2" in r.stderr, r.stderr


def test_train_reports_on_rank_0_only(monkeypatch, tmp_path):
    """Under a launcher the summary is printed by rank 0 (as the progress bar is); the other ranks stay quiet."""
    import torch.distributed as dist

    import clipmoe.train
    from clipmoe.train import TrainResult

    (tmp_path / "run.yaml").write_text(json.dumps({"data": {"train": "x.tar"}}))
    result = TrainResult(model=None, history=[{"step": 0, "loss": 1.5}], expert_load={}, data_stats={"samples": 8},
                         out_dir=tmp_path)
    monkeypatch.setattr(clipmoe.train, "train", lambda cfg: result)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for rank, printed in ((1, ""), (0, "step 0: loss 1.5\ndata: {'samples': 8}\n")):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        r = _run("train", str(tmp_path / "run.yaml"))
        assert (r.returncode, r.stdout) == (0, printed), r.stderr


def test_outputs_that_cannot_be_written_are_one_line_before_the_work(tmp_path, tiny_shards):
    """An output path under a file (or without permission): one line naming it, exit 2, before the work that
    would be lost with it (training, an evaluation)."""
    moe = clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 2, "every": 1}})
    model = clipmoe.save(moe, tmp_path / "moe.safetensors")
    dense = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "dense.safetensors")
    (tmp_path / "bench" / "red").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "bench" / "red" / "0.png")
    (tmp_path / "caps").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "caps" / "a.png")
    (tmp_path / "caps" / "a.txt").write_text("a black square")
    blocked = tmp_path / "file"
    blocked.write_text("")
    for command in (["quickstart", "--out", f"{blocked}/q"],
                    # no such model: the output is checked before the model is even read
                    ["zeroshot", "--model", str(tmp_path / "none.safetensors"), "--datasets", "folder", "--data-root",
                     str(tmp_path / "bench"), "--out", f"{blocked}/r.json"],
                    ["analyze-routing", "--model", str(model), "--data", tiny_shards["eval"], "--out", f"{blocked}/rt"],
                    ["upcycle", str(dense), f"{blocked}/u.safetensors"],
                    ["shards", "--images", str(tmp_path / "caps"), "--out", f"{blocked}/sh"],
                    ["encode", "--model", str(model), "--text", "hi", "--out", f"{blocked}/e.pt"],
                    ["validate", "--model", str(model), "--data", tiny_shards["eval"], "--out", f"{blocked}/v.json"]):
        r = _run(*command)
        assert r.returncode == 2 and r.stdout == "", (command, r.stdout)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"clipmoe {command[0]}: error: "), r.stderr
        assert str(blocked) in r.stderr and ("Not a directory" in r.stderr or "File exists" in r.stderr), r.stderr


def test_a_folder_given_for_a_model_says_which_file(tmp_path):
    """A run folder where a model file belongs: one line naming the model file in it. A training checkpoint is read
    as its model (tests/test_train.py); a torn one is one line too."""
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    for command in ("encode", "zeroshot"):
        extra = ["--text", "x"] if command == "encode" else ["--datasets", "folder", "--data-root", str(tmp_path)]
        r = _run(command, "--model", str(step), *extra)
        assert r.returncode == 2 and r.stderr.startswith(
            f"clipmoe {command}: error: training checkpoint: {step / 'state.pt'} is not readable"), r.stderr
        assert r.stderr.count("\n") == 1
        for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # mid-run: checkpoints, no model yet
            r = _run(command, "--model", str(given), *extra)
            assert r.returncode == 2 and r.stderr == (f"clipmoe {command}: error: {given} is a folder of training "
                                                      f"checkpoints; give one of them (the newest: {step})\n")
    with pytest.raises(clipmoe.ClipmoeError, match=r"is a training checkpoint, not a model file: its model is "
                                                   r"clipmoe\.resume\.load_model\("):
        clipmoe.create_model(str(step))
