"""Hostile and careless command lines: each is refused with exit status 2 and exactly one
``sarkernels: error:`` line naming the option, what it expects and what it got (so no
traceback), before any work and without writing anything."""
from pathlib import Path

import torch
from PIL import Image

from cli_harness import TINY, no_work, one_line_error, run, unwritable  # noqa: F401 (fixtures)
from sarkernels.app import data
from sarkernels.tokenizers import DigitsTokenizer


def tree(*roots):
    """Every path under ``roots`` with its bytes (a folder's: None)."""
    return {p: p.read_bytes() if p.is_file() else None
            for root in roots for p in sorted(Path(root).rglob("*"))}


def token_folder(path, tokens, labels, num_classes):
    """A token folder of digit tokens, one part, as tokenize writes it."""
    path.mkdir()
    meta = {"num_classes": num_classes, "images": len(labels), "batch": len(labels),
            "tokenizer": DigitsTokenizer(8).config()}
    data.start_token_folder(str(path), meta)
    data.write_part(data.part_path(str(path), 0), tokens, labels, [])
    return path


def test_hostile_invocations_are_one_line_before_any_work(tmp_path, capsys, run, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "0.png")
    ro = unwritable(tmp_path)
    no_cuda = [] if torch.cuda.is_available() else [
        (["train", *TINY, "--device", "cuda", "--out", tmp_path / "c"], "CUDA is not available"),
        (["tokenize", "--images", tmp_path / "images", "--vq", "vq.pt", "--out", tmp_path / "t",
          "--device", "cuda"], "CUDA is not available")]
    digits = data.digits(8)
    tokens, labels = digits.tokens[:4], digits.labels[:4] % 2
    assert len(data.load_token_folder(str(token_folder(tmp_path / "ok", tokens, labels, 2)))) == 4
    beyond = tokens.clone()
    beyond[2, 5] = digits.tokenizer.vocab_size
    beyond = token_folder(tmp_path / "beyond", beyond, labels, 2)
    one_class = token_folder(tmp_path / "one_class", tokens, labels, 1)  # labels 0 and 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{")
    train_ = ["train", *TINY, "--out", tmp_path / "fresh"]
    sample = ["sample", "--ckpt", run]
    tokenize = ["tokenize", "--images", tmp_path / "images", "--vq", "vq.pt"]
    cases = no_cuda + [
        (train_ + ["--batch", "0"], "--batch must be >= 1, got 0"),
        (train_ + ["--ckpt-every", "0"], "--ckpt-every must be >= 1, got 0"),
        (train_ + ["--ckpt-every", "-1"], "--ckpt-every must be >= 1, got -1"),
        (train_ + ["--steps", "0"], "--steps must be >= 1, got 0"),
        (train_ + ["--steps", "-5"], "--steps must be >= 1, got -5"),
        (train_ + ["--layers", "0"], "--layers must be >= 1, got 0"),
        (train_ + ["--class-dropout", "2"], "--class-dropout is a probability in [0, 1), got 2.0"),
        (train_ + ["--lr", "0"], "--lr must be > 0"),
        (train_ + ["--dim", "48", "--heads", "4"], "head dim D must be a multiple of 8"),
        (train_ + ["--dim", "30", "--heads", "4"], "--dim 30 must split evenly into --heads 4"),
        (train_ + ["--device", "tpu"], "--device 'tpu' is not a device"),
        (train_ + ["--model", "gpt"], "argument --model: invalid choice"),
        (train_ + ["--steps", "ten"], "argument --steps: invalid int value"),
        (["train", *TINY, "--out", ro / "run"], "--out"),
        (["train", *TINY, "--out", a_file], "is a file; give a folder"),
        (["train", "--out", tmp_path / "none", "--resume"], "does not exist"),
        (["train", "--out", run, "--resume", "--overwrite"], "pass one"),
        (sample + ["--labels", ""], "--labels is empty"),
        (sample + ["--labels", "1,2,"], "--labels '1,2,' has an empty item"),
        (sample + ["--labels", "3,12"], "--labels must be in [0, 10)"),
        (sample + ["--mask", "top"], "pass --image too"),
        (sample + ["--image", images / "0.png", "--mask", "middle"], "'middle' is neither"),
        (sample + ["--image", tmp_path / "none.png"], "(--image): no such file"),
        (sample + ["--out", tmp_path], "is a folder; give a file name such as"),
        (sample + ["--out", tmp_path / "grid.foo"], "picture extension"),
        (sample + ["--out", ro / "grid.png"], "cannot write there"),
        (sample + ["--cfg", "-1"], "cfg_scale must be >= 0"),
        (sample + ["--n", "0"], "argument --n: must be an integer >= 1"),
        (sample + ["--device", "tpu"], "--device 'tpu' is not a device"),
        (tokenize + ["--out", a_file], "is a file; give a folder"),
        (tokenize + ["--out", ro / "tokens"], "--out"),
        (tokenize + ["--out", tmp_path / "t", "--batch", "0"], "argument --batch: must be an integer >= 1"),
        (["tokenize", "--images", tmp_path / "none", "--vq", "vq.pt", "--out", tmp_path / "t"],
         "is not a folder"),
        (["demo", "--cfg", "-1", "--out", tmp_path / "demo"], "cfg_scale must be >= 0"),
        (["demo", "--out", a_file], "is a file; give a folder"),
        (["demo", "--out", ro / "demo"], "--out"),
        (["demo", "--device", "tpu", "--out", tmp_path / "demo"], "is not a device"),
        (["digit", "--label", "11"], "--label is a digit 0 to 9"),
        (["digit", "--label", "3", "--index", "999", "--out", tmp_path / "d.png"], "--index must be in"),
        (["digit", "--label", "3", "--out", tmp_path], "is a folder"),
        (["fly"], "invalid choice: 'fly'"),
        (["sample"], "the following arguments are required: --ckpt"),
        (["digit", "--label", "three"], "argument --label: invalid int value: 'three'"),
        (train_ + ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        # inf and nan parse as floats; every float option refuses them
        (train_ + ["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
        (train_ + ["--lr", "fast"], "argument --lr: must be a finite number, got 'fast'"),
        (train_ + ["--weight-decay", "nan"], "argument --weight-decay: must be a finite number"),
        (train_ + ["--dropout=-inf"], "argument --dropout: must be a finite number, got '-inf'"),
        (train_ + ["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got '-1'"),
        (train_ + ["--seed", str(2 ** 64)], "argument --seed: must be an integer in [0, 2**64)"),
        (sample + ["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
        (sample + ["--cfg", "inf"], "argument --cfg: must be a finite number, got 'inf'"),
        (sample + ["--resolution", "2x", "--spatial-cfg", "nan"], "argument --spatial-cfg: must be a finite"),
        (sample + ["--temperature", "inf"], "argument --temperature: must be a finite number"),
        (sample + ["--top-p", "nan"], "argument --top-p: must be a finite number"),
        (sample + ["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64)"),
        (["demo", "--cfg", "inf", "--out", tmp_path / "demo"], "argument --cfg: must be a finite"),
        (train_ + ["--data", beyond], "token 17 is outside [0, 17) (17 from the vocabulary of"),
        (train_ + ["--data", one_class], "label 1 is outside [0, 1) (1 from num_classes in its meta"),
        (train_ + ["--data", corrupt], "meta.json is corrupt"),
        (train_ + ["--data", a_file], "unknown dataset"),
        (sample + ["--n", str(10 ** 12)], "--n 1000000000000 rows of 10 columns are "
                                          "10000000000000 pictures; a grid holds at most 1024"),
        (sample + ["--n", "103"], "are 1030 pictures; a grid holds at most 1024"),
        (sample + ["--n", "-3"], "argument --n: must be an integer >= 1, got '-3'"),
        (sample + ["--resolution", "1000x"], "tokens 8000x8000; at most 64x64, so at most 8x"),
        (sample + ["--resolution", "9x"], "tokens 72x72; at most 64x64"),
        (sample + ["--resolution", "x"], "--resolution must be an integer scale of 2 or more"),
        (sample + ["--resolution", "2x", "--ntk-boundary", str(10 ** 30)],
         "--ntk-boundary must be in [0, 4] for"),  # head dim 32 / 2 heads: 4 per axis
        (sample + ["--resolution", "2x", "--ntk-boundary", "5"], "got 5"),
        (sample + ["--resolution", "2x", "--ntk-boundary=-1"], "--ntk-boundary must be >= 0"),
    ]
    for args, message in cases:
        before = tree(tmp_path, run)
        one_line_error(capsys, args, message)
        assert tree(tmp_path, run) == before, args  # no --out created, nothing changed
