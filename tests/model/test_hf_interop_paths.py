"""transformers / peft workflows a user runs on a RetNet outside generation, each compared with what the library
does (or, where RetNet must differ, refused by name)."""

import pytest
import torch

from retnet.model import RetNetConfig
from retnet.model.hub import HubError, resolve_pretrained


def test_a_source_starting_with_a_tilde_of_no_user_is_a_path(tmp_path, monkeypatch):
    # Path("~name").expanduser() raises a bare RuntimeError ("Could not determine home directory") for a user that
    # does not exist: a directory of that name in the working directory must still load, and a missing one be
    # refused naming it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~retnet-no-such-user").mkdir()
    assert resolve_pretrained("~retnet-no-such-user").resolve() == tmp_path / "~retnet-no-such-user"
    with pytest.raises(HubError, match=r"'~retnet-no-such-user-either/model': no such directory"):
        resolve_pretrained("~retnet-no-such-user-either/model")


@pytest.mark.parametrize("hidden_act", [("gelu", "relu"), None, {"name": "gelu"}])
def test_hidden_act_that_is_neither_a_name_nor_a_list_is_refused_as_the_field(hidden_act):
    # A tuple was taken as one activation name: "(layer 0): unknown activation ('gelu', 'relu')".
    with pytest.raises(ValueError, match=r"RetNetConfig.hidden_act must be one activation name or a list"):
        RetNetConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act)


def test_flattening_collator_offsets_without_position_ids_keep_documents_apart(model_factory):
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False) marks the packed documents
    # only by cu_seq_lens_q/k, which transformers' flash-attention models honour; ignored, the documents run as one
    # sequence, each reading the state of those before it.
    from transformers import DataCollatorWithFlattening

    model = model_factory()
    docs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": doc} for doc in docs])
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([doc])).logits for doc in docs], dim=1)
        torch.testing.assert_close(model(**batch).logits, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position_ids", [False, True])
def test_flattening_collator_offsets_pack_a_classifier_and_the_loss_too(model_factory, position_ids):
    from transformers import DataCollatorWithFlattening

    from retnet.model import RetNetForSequenceClassification

    docs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=position_ids)(
        [{"input_ids": doc} for doc in docs])
    model = model_factory()
    with torch.no_grad():
        packed = model(**batch).loss
        expected = model(batch["input_ids"], labels=batch["labels"],
                         cu_seqlens=batch["cu_seq_lens_q"]).loss
        torch.testing.assert_close(packed, expected)
        torch.manual_seed(0)
        classifier = RetNetForSequenceClassification(model.config).eval()
        scores = classifier(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = torch.cat([classifier(torch.tensor([doc])).logits for doc in docs])
        torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)


def test_peft_lora_without_target_modules_adapts_the_decoder_linears(model_factory):
    # peft has no default LoRA targets for model_type "retnet": get_peft_model asked for target_modules
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model_factory(), LoraConfig(task_type="CAUSAL_LM", r=4))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
               if ".lora_A." in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "up_proj", "down_proj"}
