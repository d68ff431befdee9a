"""composer.run.generate: UTF-8 streaming of byte tokens, prompts, finding a run's checkpoint,
the sample a training run ends with."""
import io

import pytest
import torch

import composer
from composer.core.errors import CheckpointError, HycompError
from composer.run.generate import (Utf8Stream, decode, find_checkpoint, printable,
                                   prompts_from_file, sample_prompt, training_sample)


def test_a_multibyte_character_split_across_tokens_waits_for_its_last_byte():
    out = io.StringIO()
    s = Utf8Stream(out)
    pieces = []
    for ch in "é€😀":                                  # 2, 3 and 4 bytes
        raw = list(ch.encode("utf-8"))
        pieces += [s.write([b]) for b in raw[:-1]]
        assert out.getvalue().endswith(ch) is False
        pieces.append(s.write(raw[-1:]))
        assert out.getvalue().endswith(ch)
    assert [p for p in pieces if p] == ["é", "€", "😀"]
    assert s.close() == "" and out.getvalue() == "é€😀"


def test_an_unfinished_sequence_is_written_as_a_replacement_at_the_end():
    out = io.StringIO()
    s = Utf8Stream(out)
    assert s.write(b"ok\xe2\x82") == "ok"
    assert s.close() == "\ufffd" and out.getvalue() == "ok\ufffd"


def test_streamed_pieces_add_up_to_the_whole_decode():
    """Random bytes (valid and invalid UTF-8, tokens past 255 too) fed in random pieces."""
    for _ in range(50):
        n = int(torch.randint(1, 64, ()))
        pool = torch.cat([torch.randint(0, 256, (n,)),
                          torch.tensor(list("añ€😀".encode()) * 2),
                          torch.randint(256, 300, (1,))])
        toks = pool[torch.randperm(len(pool))].tolist()
        out = io.StringIO()
        s = Utf8Stream(out)
        cuts = sorted(torch.randint(0, len(toks) + 1, (5,)).tolist())
        for a, b in zip([0] + cuts, cuts + [len(toks)]):
            s.write(toks[a:b])
        s.close()
        assert out.getvalue() == decode(toks)
        assert decode(toks) == bytes(min(t, 0xFF) for t in toks).decode("utf-8", "replace")


def test_control_characters_are_escaped_for_a_terminal():
    assert printable("a\x1b[31mb\tc\nd\r\x7f\x85é€") == "a\\x1b[31mb\tc\nd\\r\\x7f\\x85é€"
    out = io.StringIO()
    Utf8Stream(out, escape_controls=True).write(b"\x07ok\n")
    assert out.getvalue() == "\\x07ok\n"


def test_prompt_file_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("first\r\n\nsecond €\n\n".encode())
    got = prompts_from_file(f)
    assert [p.text for p in got] == ["first", "second €"]
    assert [p.where for p in got] == [f"{f}:1", f"{f}:3"]
    assert got[1].tokens == list("second €".encode())
    f.write_bytes(b"ok\nok\n\xc3\x28\n")
    with pytest.raises(HycompError) as e:
        prompts_from_file(f)
    assert e.value.where == f"{f}:3" and "not UTF-8" in e.value.why


def test_find_checkpoint_names_what_it_found(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (3, 12):
        (ckpts / f"step_{step:06d}").mkdir(parents=True)
        (ckpts / f"step_{step:06d}" / "recipe.json").write_text("{}")
    (ckpts / "latest").write_text("step_000003\n")
    assert find_checkpoint(run) == ckpts / "step_000003"       # latest, not the highest
    assert find_checkpoint(ckpts) == ckpts / "step_000003"     # RUN/checkpoints
    assert find_checkpoint(ckpts / "step_000012") == ckpts / "step_000012"
    (ckpts / "latest").write_text("step_000099\n")
    with pytest.raises(CheckpointError) as e:
        find_checkpoint(run)
    assert "latest points at no checkpoint" in e.value.what and "train.resume" not in e.value.fix
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "summary.json").write_text("{}")
    with pytest.raises(CheckpointError, match="stopped before its first one"):
        find_checkpoint(tmp_path / "stopped")


def test_sample_prompt_ends_at_a_line_and_a_whole_character():
    text = "# first line\nsecond line that runs on and on and on é"
    window = torch.tensor(list(text.encode()), dtype=torch.uint8)
    assert sample_prompt(window) == "# first line\n"
    raw = ("x" * 47 + "é").encode()                  # 49 bytes: the cut at 48 splits é
    assert sample_prompt(torch.tensor(list(raw))) == "x" * 47
    assert sample_prompt(torch.tensor(list(b"ab\ncd"))) == "ab\ncd"   # newline too early


def test_training_sample_is_greedy_and_stops_at_the_model_positions():
    recipe = composer.load_recipe("config", ["model.d_model=32", "model.n_layers=2",
                                             "model.schedule.ratio=1:1", "model.max_seq_len=24",
                                             "data.seq_len=16"])
    model = composer.build_model(recipe)
    window = torch.randint(32, 127, (16,))
    prompt, text = training_sample(model, window, 64)
    assert prompt == bytes(window.tolist()).decode()
    assert model.training                              # left as it was
    ids = torch.tensor([list(prompt.encode())])
    want = model.eval().generate(ids, 24 - 16)[0, 16:].tolist()   # 8: the positions left
    assert text == decode(want)
