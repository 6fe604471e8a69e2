"""How many times one `loraft train CONFIG` reads its data files and encodes a row, up to the moment the base
model's weights load (every data pass of a run happens before then; training and the held-out scores reuse
the encoded rows). Counts opens of the data files (to parse or to hash them) and tokenizer calls that
encode a row for training (the ones asking for offsets, data/rows.py `encode`).

    python scripts/count_data_passes.py recipes/quickstart.yaml
"""

from __future__ import annotations

import argparse
import builtins
import io
import pathlib
import tempfile

import transformers
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class _Stop(Exception):
    pass


def main(config: str) -> dict:
    from lora_ft.config_io import load_config

    cfg = load_config(config)
    data_files = {pathlib.Path(s.path).expanduser().resolve() for s in (cfg.data.train, cfg.data.eval) if s is not None}
    counts = {"data_reads": 0, "row_encodings": 0}
    rows = sum(1 for f in data_files for line in f.read_bytes().splitlines() if line.strip())

    def is_data(path) -> bool:
        try:
            return pathlib.Path(path).resolve() in data_files
        except TypeError:
            return False

    real_open, real_call = builtins.open, PreTrainedTokenizerBase.__call__

    def counting_open(file, *args, **kwargs):
        counts["data_reads"] += is_data(file)
        return real_open(file, *args, **kwargs)

    def counting_call(self, *args, **kwargs):
        counts["row_encodings"] += bool(kwargs.get("return_offsets_mapping"))
        return real_call(self, *args, **kwargs)

    def stop(*args, **kwargs):
        raise _Stop

    builtins.open = io.open = counting_open
    PreTrainedTokenizerBase.__call__ = counting_call
    transformers.AutoModelForCausalLM.from_pretrained = stop
    from lora_ft.train import train

    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg.model_copy(update={"output_dir": f"{tmp}/run"}))
    except _Stop:
        pass
    finally:
        builtins.open = io.open = real_open
        PreTrainedTokenizerBase.__call__ = real_call
    return {"rows": rows, **counts}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="recipes/quickstart.yaml", help="the run config (default: the quickstart)")
    print(main(parser.parse_args().config))
