"""The source model names of the published benchmarks the importer reads, mapped to registry names
(configs/models.yaml): each import format's default ``model_names``."""

from __future__ import annotations


# RouterBench column name -> registry name (configs/models.yaml).
ROUTERBENCH_MODELS: dict[str, str] = {
    "gpt-4-1106-preview": "gpt-4-1106-preview", "gpt-3.5-turbo-1106": "gpt-3.5-turbo-1106",
    "claude-v2": "claude-v2", "claude-v1": "claude-v1", "claude-instant-v1": "claude-instant-v1",
    "meta/llama-2-70b-chat": "llama-2-70b-chat", "mistralai/mixtral-8x7b-chat": "mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat": "yi-34b-chat", "meta/code-llama-instruct-34b-chat": "code-llama-34b-chat",
    "WizardLM/WizardLM-13B-V1.2": "wizardlm-13b-v1.2", "mistralai/mistral-7b-chat": "mistral-7b-chat",
}


# RouterDC column name -> registry name: its seven open 7B-8B models (../shared/data/routerdc).
ROUTERDC_MODELS: dict[str, str] = {
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1", "meta-math/MetaMath-Mistral-7B": "metamath-mistral-7b",
    "itpossible/Chinese-Mistral-7B-v0.1": "chinese-mistral-7b-v0.1", "HuggingFaceH4/zephyr-7b-beta": "zephyr-7b-beta",
    "cognitivecomputations/dolphin-2.6-mistral-7b": "dolphin-2.6-mistral-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "cognitivecomputations/dolphin-2.9-llama3-8b": "dolphin-2.9-llama3-8b",
}
