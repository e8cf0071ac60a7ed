"""The README's library snippet runs as written (the default model, 300 catalog items) and ranks
what it says: the rcllm ranking of its four candidates puts first what full prefill of the same
prompt puts first (an independent reference), and the retrieve -> rerank answer is 20 served items the user has not
seen."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_library_snippet_runs_as_written(smollm2):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Library\n\n```python\n(.*?)```", text, re.DOTALL).group(1)
    scope, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    engine, prompt, user, split, items = (scope[k] for k in ("engine", "prompt", "user", "split", "items"))
    full = engine.rank(prompt, "full").order
    rcllm = engine.rank(prompt, "rcllm", user_id=user).order
    assert sorted(rcllm) == [0, 1, 2, 3] and rcllm[0] == full[0]
    ranking = scope["rec"].recommend(user, split.history(user), num_candidates=20).ranking
    assert len(ranking) == 20 and set(ranking) <= set(items) and not set(ranking) & set(split.history(user))
    printed = out.getvalue().splitlines()
    assert len(printed) == 2 and printed[1] == str(ranking)
    assert [int(x) for x in re.findall(r"\d+", printed[0])] == list(rcllm)
