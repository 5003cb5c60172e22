from twotower.eval.metrics import distinct_n, exact_match, prefix_agreement, repetition_rate, token_agreement


def test_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 9, 3, 9], [1, 2, 3, 4]) == 0.5
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # missing positions disagree
    assert token_agreement([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4]) == 0.5  # so do extra ones
    assert prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert exact_match([1, 2], [1, 2]) and not exact_match([1, 2], [1, 2, 3])


def test_distinct_and_repetition():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([1, 1, 1, 1], 1) == 0.25
    assert distinct_n([1, 2, 1, 2, 1, 2], 2) == 2 / 5
    assert repetition_rate([1, 2, 3, 4, 5, 6], 2) == 0.0
    assert repetition_rate([7, 8, 7, 8, 7, 8], 2) == 3 / 5
