import pytest

from workflows.core.reconcile import ReconcileError, check, reconcile


def test_clean_split():
    rec = reconcile(["a", "b", "c"], ["a", "c"], ["b"])
    assert rec.ok and (rec.inputs, rec.outputs, rec.errors) == (3, 2, 1)


@pytest.mark.parametrize("outputs, errors, attr, ids", [
    (["a"], [], "missing", ["b"]),
    (["a", "b", "z"], [], "unexpected", ["z"]),
    (["a", "b"], ["b"], "both", ["b"]),
    (["a", "a", "b"], [], "duplicates", ["a"]),
    (["a"], ["b", "b"], "duplicates", ["b"]),
])
def test_every_kind_of_loss_is_caught(outputs, errors, attr, ids):
    rec = reconcile(["a", "b"], outputs, errors)
    assert not rec.ok
    assert getattr(rec, attr) == ids


def test_check_raises_with_explanation():
    with pytest.raises(ReconcileError, match=r"stage s: 2 inputs, 1 outputs, 0 errors; 1 missing \(e.g. b\)"):
        check("s", ["a", "b"], ["a"], [])
