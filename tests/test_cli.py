"""The CLI keeps no state between invocations: --debug, environment variables, logger levels and warning
filters hold for one command and are restored after it."""

from __future__ import annotations

import logging
import os
import warnings

import pytest


def test_debug_holds_for_its_own_invocation_only(tiny_config, write_yaml, run_cli, monkeypatch):
    import lora_ft.train as train_module

    def boom(cfg, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module, "preflight", boom)
    config = write_yaml(tiny_config)
    with pytest.raises(RuntimeError, match="boom"):
        run_cli("--debug", "validate", config)
    code, _, err = run_cli("validate", config)  # the same process, the next command: no traceback
    assert code == 1 and err == "internal error: RuntimeError: boom (rerun with --debug for the traceback)\n"


def test_a_command_restores_environment_loggers_and_warning_filters(tiny_config, write_yaml, run_cli, monkeypatch):
    import lora_ft.train as train_module

    seen = {}

    def look(cfg, **kwargs):
        seen["env"] = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        seen["level"] = logging.getLogger("transformers").level
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("`some_internal` is deprecated and will be removed in v6.", FutureWarning)
        seen["caught"] = [str(w.message) for w in caught]
        raise RuntimeError("looked")

    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    monkeypatch.setattr(train_module, "preflight", look)
    level, filters = logging.getLogger("transformers").level, list(warnings.filters)
    code, _, err = run_cli("validate", write_yaml(tiny_config))
    assert code == 1 and "looked" in err
    # only the warning decided on by name (cli_common.QUIET_WARNINGS) is hidden; any other deprecation shows
    assert seen == {"env": "1", "level": logging.ERROR, "caught": ["`some_internal` is deprecated and will be removed in v6."]}
    assert "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ
    assert logging.getLogger("transformers").level == level and warnings.filters == filters
