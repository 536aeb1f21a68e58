"""K-matrix parsing, validation and defaults (``csdrafting.kmatrix``)."""

from __future__ import annotations

import pytest

from csdrafting import ConfigError, KMatrix
from csdrafting.kmatrix import MAX_ENTRY


def test_json_shorthand_lists_and_kmatrix_agree():
    rows = ((2, 1, 3), (0, 1, 2), (0, 0, 3))
    forms = [
        "[[2,1,3],[0,1,2],[0,0,3]]",
        " [[2, 1, 3], [0, 1, 2], [0, 0, 3]] ",
        "2,1,3;1,2;3",
        " 2, 1 ,3 ; 1,2 ; 3 ",
        [[2, 1, 3], [0, 1, 2], [0, 0, 3]],
        ((2, 1, 3), (0, 1, 2), (0, 0, 3)),
        KMatrix(rows),
    ]
    for form in forms:
        k = KMatrix.parse(form, 3)
        assert k.rows == rows, form
        assert k.size == 3
    assert KMatrix.parse("4", 1).rows == ((4,),)
    assert KMatrix.parse("[[4]]", 1).rows == ((4,),)
    assert str(KMatrix.parse("2,1,3;1,2;3", 3)) == "[[2, 1, 3], [0, 1, 2], [0, 0, 3]]"
    assert KMatrix.parse(str(KMatrix(rows)), 3).rows == rows  # str() round-trips through parse


def test_cumulative_ends():
    k = KMatrix.parse("2,1,3;1,2;3", 3)
    assert k.cumulative(0) == [2, 3, 6]
    assert k.cumulative(1) == [0, 1, 3]
    assert k.cumulative(2) == [0, 0, 3]


def test_no_drafters_means_an_empty_matrix():
    assert KMatrix.parse([], 0).rows == ()
    assert KMatrix.parse("[]", 0).rows == ()
    with pytest.raises(ConfigError, match="empty"):
        KMatrix.parse("[[1]]", 0)


BAD = [
    ("[[2,1],[0,1]]", 3, r"3x3"),  # wrong shape
    ("[[2,1,3],[0,1,2]]", 3, r"3x3"),  # missing row
    ("[[2,1,3],[0,1],[0,0,3]]", 3, r"3x3"),  # ragged
    ("[2, 1]", 2, r"2x2"),  # rows are not lists
    ("[]", 1, r"1x1"),
    ("2,1;1;3", 2, r"row 1 must list columns 1..1 \(1 numbers\), got 1|row 2|shorthand"),  # too many rows
    ("2,1,3;1;3", 3, r"shorthand row 1 must list columns 1..2 \(2 numbers\), got 1"),
    ("2,1;", 2, r"shorthand row 1"),
    ("2,x;1", 2, r"row 0 .* comma-separated integers"),
    ("[[2,1],[0,1]", 2, r"not valid JSON"),
    ("[[2,-1],[0,1]]", 2, r"\[0\]\[1\] must be in 0\.\.256, got -1"),  # negative
    ("2,-1;1", 2, r"\[0\]\[1\] must be in 0\.\.256, got -1"),
    (f"[[{MAX_ENTRY + 1}]]", 1, r"must be in 0\.\.256"),
    ("[[2,1.5],[0,1]]", 2, r"\[0\]\[1\] must be an integer, got 1\.5"),  # non-integer
    ('[[2,"1"],[0,1]]', 2, r"must be an integer"),
    ("[[true,1],[0,1]]", 2, r"must be an integer, got True"),
    ("[[NaN]]", 1, r"must be an integer"),
    ("[[2,1],[1,1]]", 2, r"\[1\]\[0\] is below the diagonal .* must be 0, got 1"),  # below-diagonal nonzero
    ("[[2,1,3],[0,1,2],[0,4,3]]", 3, r"\[2\]\[1\] is below the diagonal"),
]


@pytest.mark.parametrize("text,num_drafters,message", BAD, ids=[b[0] for b in BAD])
def test_invalid_matrices_raise_clear_config_errors(text, num_drafters, message):
    with pytest.raises(ConfigError, match=message) as info:
        KMatrix.parse(text, num_drafters)
    assert "\n" not in str(info.value)  # one line, for the CLI's "error: ..." output


@pytest.mark.parametrize("value", [None, 3, 2.5, {"a": 1}])
def test_other_types_are_refused(value):
    with pytest.raises(ConfigError, match="K-matrix must be"):
        KMatrix.parse(value, 1)


@pytest.mark.parametrize("num_neural", [0, 1, 2, 3])
@pytest.mark.parametrize("mag", [False, True])
def test_default_is_valid_for_any_number_of_drafters(num_neural, mag):
    k = KMatrix.default(num_neural, mag)
    n = num_neural + int(mag)
    assert k.size == n
    assert KMatrix.parse(k.as_lists(), n) == k  # passes its own validation
    if n:
        assert sum(k.rows[0]) > 0  # the target always gets a draft
    for r in range(1, n):  # every neural reviewer gets something to review
        assert sum(k.rows[r]) > 0


def test_default_values():
    assert KMatrix.default(0, False).rows == ()
    assert KMatrix.default(0, True).rows == ((8,),)
    assert KMatrix.default(1, False).rows == ((4,),)
    assert KMatrix.default(2, True).rows == ((2, 1, 4), (0, 1, 3), (0, 0, 3))
