"""vLLM's `--api-key k1 k2` (its flag takes several values): `retnet-serve --api-keys k1 k2` stopped at "unrecognized
arguments: k2"; only the comma form read."""

import pytest

from retnet.serve.__main__ import parse_settings


@pytest.mark.parametrize(("flags", "keys"), [
    (["--api-keys", "k1", "k2"], ["k1", "k2"]),
    (["--api-key", "k1", "k2"], ["k1", "k2"]),  # vLLM's spelling, an abbreviation argparse takes
    (["--api-keys", "k1,k2"], ["k1", "k2"]),
    (["--api-keys", '["k1", "k2"]'], ["k1", "k2"]),
    (["--api-keys", "k1", "--max-running", "4"], ["k1"]),
])
def test_api_keys_flag_takes_several_values_as_vllm_does(flags, keys):
    assert parse_settings(["--model", "m", *flags]).api_keys == keys
