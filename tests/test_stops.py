from ggufllm.engine.stops import StopScanner


def feed(stops, pieces):
    s = StopScanner(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = s.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    return "".join(out), hit


def test_stop_spanning_tokens_is_cut_and_not_shown():
    assert feed(["\nQuestion:"], ["Paris", ".\nQue", "stion: what"]) == ("Paris.", True)


def test_partial_stop_prefix_is_released_at_the_end():
    assert feed(["\nQuestion:"], ["Paris", "\nQue"]) == ("Paris\nQue", False)


def test_no_stops_passes_text_through():
    assert feed([], ["a", "b"]) == ("ab", False)


def test_earliest_stop_wins():
    assert feed(["\n\n", "END"], ["xEND\n\ny"]) == ("x", True)


def test_held_back_tail_is_bounded():
    s = StopScanner(["abcdef"])
    for _ in range(1000):
        s.push("zzzzzzzz")
    assert len(s._tail) <= 5
