"""The soak benchmark: a load with card kills and pauses under it; nothing lost, tokens as before."""
from __future__ import annotations

import json

from bench import soak


def test_soak_serves_through_kills_and_pauses_and_loses_nothing(tmp_path, shm_prefix, capsys):
    out = tmp_path / "soak.json"
    code = soak.main(["--minutes", "0.2", "--clients", "2", "--kill-every", "4", "--pause-every", "6",
                      "--pause-seconds", "2.5", "--heartbeat-timeout", "1.5", "--max-tokens", "6",
                      "--json", str(out), "--shm-prefix", shm_prefix])
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert code == 0, s
    assert s["lost"] == 0 and s["wrong"] == 0 and s["served"] > 0
    # faults go one at a time (a fault due during the last one's recovery waits): a kill, then a pause
    assert s["kills"] >= 1 and s["pauses"] >= 1 and s["recoveries"] >= 2, s
    assert all(f["recovered"] and f["tokens_ok"] for f in doc["records"]), doc["records"]
    assert s["requests"] == s["served"] + s["failed"] + s["lost"] + s["wrong"]
    assert all("the cards failed: card" in msg for msg in s["errors"])
    table = capsys.readouterr().out
    assert "recovery mean/max (wall s)" in table and "kill  card" in table
