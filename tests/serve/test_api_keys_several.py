"""--api-keys' several values (vLLM's `--api-key k1 k2`) each read as the flag's one value is: a comma list or a JSON
list in one of them was a single key holding the commas or brackets."""

import pytest

from retnet.serve.settings import ServeSettings


@pytest.mark.parametrize(("values", "keys"), [
    (["k1", "k2"], ["k1", "k2"]),
    (["k1,k2", "k3"], ["k1", "k2", "k3"]),
    (['["k1", "k2"]'], ["k1", "k2"]),
    (["k1,", " k2 "], ["k1", "k2"]),
])
def test_each_of_several_api_keys_values_reads_as_one_value_does(values, keys):
    assert ServeSettings(model="m", api_keys=values).api_keys == keys


def test_a_blank_one_of_several_api_keys_is_still_refused():
    with pytest.raises(ValueError, match=r"api_keys \(--api-keys\) must not hold a blank key"):
        ServeSettings(model="m", api_keys=["k1", " "])
