"""The code version in every cache key: what counts as a code change."""

from __future__ import annotations

from tasks.common import source_fingerprint


def test_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path):
    """Editing a docstring or a comment must not invalidate hours of cached stages; a code edit must."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "m.py").write_text('"""Module doc."""\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    (pkg / "a.py").write_text("class A:\n    '''Only a docstring.'''\n")
    base = source_fingerprint(pkg)

    (pkg / "sub" / "m.py").write_text('"""Other doc."""\n# a comment\ndef f(x):  # why\n\n    return x + 1\n')
    (pkg / "a.py").write_text("class A:\n    pass\n")
    assert source_fingerprint(pkg) == base

    (pkg / "sub" / "m.py").write_text('def f(x):\n    return x + 2\n')
    assert source_fingerprint(pkg) != base
    (pkg / "sub" / "m.py").write_text('def f(x):\n    return x + 1\n')
    assert source_fingerprint(pkg) == base
    (pkg / "sub" / "m.py").rename(pkg / "sub" / "n.py")  # a moved module is a change
    assert source_fingerprint(pkg) != base
    (pkg / "b.py").write_text("def broken(:\n")  # unparsable: still hashed, by its bytes
    moved = source_fingerprint(pkg)
    (pkg / "b.py").write_text("def broken(:\n\n")
    assert source_fingerprint(pkg) != moved
