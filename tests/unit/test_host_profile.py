"""``benchmarks.host_profile`` runs on CPU with the tiny random model and, with ``--dump``, saves full pstats files
that load elsewhere (the device run's profile is read back on the development machine)."""

from __future__ import annotations

import pstats

from benchmarks.host_profile import main


def test_dumped_profiles_load_and_hold_the_engine(tmp_path, capsys) -> None:
    main(["--model", "tiny-llama-random", "--device", "cpu", "--length", "96", "--chunks", "32", "--top", "5",
          "--decode-tokens", "2", "--set", "local_window=16", "num_sink_tokens=4", "budget=16",
          "--dump", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "==== chunk 32:" in printed and "==== decode:" in printed
    for name, entry in (("prefill_32.prof", "feed"), ("decode_32.prof", "step")):
        stats = pstats.Stats(str(tmp_path / name))
        functions = {func for _, _, func in stats.stats}
        assert entry in functions, (name, sorted(functions)[:20])
