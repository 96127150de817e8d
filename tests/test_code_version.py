"""The code version in every cache key: what counts as a code change."""

from __future__ import annotations

from tasks.common import _code_lines, source_fingerprint


def test_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path):
    """Editing a docstring or a comment must not invalidate hours of cached stages; a code edit must."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "m.py").write_text('"""Module doc."""\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    (pkg / "a.py").write_text("class A:\n    '''Only a docstring.'''\n")
    base = source_fingerprint(pkg)

    (pkg / "sub" / "m.py").write_text('"""Other doc,\n   two lines."""\n# a comment\ndef f(x):  # why\n\n    return x + 1\n')
    (pkg / "a.py").write_text("class A:\n    '''Another docstring, naïve − ünicode.'''  # and a comment\n")
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


def test_code_lines_are_the_source_text_not_a_version_specific_tree():
    """The fingerprint hashes source text (comments, docstrings, blank lines removed), so 3.11 and
    3.12 workers agree; a '#' inside a string and a string that is not a docstring are code."""
    src = ('"""Doc."""\nimport os  # why\n\n\ndef f(x):\n    """Doc."""\n    s = f"{x}#not a comment"\n'
           '    "a string statement after code stays"\n    return s\n').encode()
    assert _code_lines(src) == ["import os", "def f(x):", '    s = f"{x}#not a comment"',
                                '    "a string statement after code stays"', "    return s"]


def test_code_lines_count_rows_as_python_does():
    """A string holding a line separator Python does not split on (\\u2028, form feed) must not
    shift the rows: the comment and the docstring are still found."""
    src = 'x = "a\u2028b"  # c\ndef f():\n    """d\x0ce"""\n    return 1  # z\n'.encode()
    assert _code_lines(src) == ['x = "a\u2028b"', "def f():", "    return 1"]
