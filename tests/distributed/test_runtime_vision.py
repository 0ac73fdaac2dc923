"""Vision models under tensor parallelism: a tiny LLaVA (image features spliced into the embeddings, a prefill
chunked across the image), a tiny Qwen2-VL (M-RoPE tables per request, chunked too) and a tiny Mllama
(cross-attention state kept per request) through a Runner with
MISTRALRS_TP_SIZE=2 (gloo) give the one-process greedy tokens for an image request, a text-only request, two image
requests at once and an image request after those finished. In one process, a runner that only replays the head's
steps computes the head's logits and holds the same image state, each request's image tensors sent once."""

from __future__ import annotations

import pytest
import torch

from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
from mistralrs.worker.model_runner import ModelRunner, StepInputs
from tests.distributed.test_runtime import tp_runner
from tests.distributed.test_runtime_replay import ReplayingPeers
from tests.distributed.tp_helpers import rank_children
from tests.tiny_models import CHARACTERS
from tests.vision import test_mllama, test_qwen2_vl
from tests.vision.siglip_helpers import banned_ids, data_url, random_image
from tests.vision.tiny_vision import LLAVA_BANNED, make_tiny_llava_dir, sample_images, write_tokenizer_files

NUM_TOKENS = 8


def llava_content(image) -> list[dict]:
    return [data_url(image), {"type": "text", "text": "Describe it."}]


def qwen_content(image) -> list[dict]:
    return [{"type": "text", "text": "Compare"}, data_url(image), {"type": "text", "text": " please."}]


def mllama_content(image) -> list[dict]:
    return [{"type": "text", "text": "Say<|image|>what"}, data_url(image)]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (make a Runner, logit bias, [image request, text request, image request, image request])."""
    llava = tmp_path_factory.mktemp("llava")
    make_tiny_llava_dir(llava)
    mllama = str(tmp_path_factory.mktemp("mllama"))
    test_mllama.write_tiny_mllama(mllama)
    images = sample_images()
    mllama_images = [random_image(45, 20, seed=1), random_image(11, 40, seed=2), random_image(30, 30, seed=3)]
    qwen = tmp_path_factory.mktemp("qwen2_vl")
    test_qwen2_vl.write_tiny_qwen("qwen2_vl", qwen)
    qwen_tokenizer, _ = test_qwen2_vl.tokenizer_and_ids()
    write_tokenizer_files(qwen, qwen_tokenizer, test_qwen2_vl.QWEN_CHAT_TEMPLATE)
    qwen_images = test_qwen2_vl.tiny_images()
    return {
        "llava": (lambda: Runner(Which.VisionPlain(model_id=str(llava), arch=VisionArchitecture.LLaVA,
                                                   dtype=ModelDType.F32), prompt_chunksize=8),
                  LLAVA_BANNED, [llava_content(images[0]), "Describe nothing.", llava_content(images[1]),
                                 llava_content(images[2])]),
        "qwen2_vl": (lambda: Runner(Which.VisionPlain(model_id=str(qwen), arch=VisionArchitecture.Qwen2VL,
                                                      dtype=ModelDType.F32), prompt_chunksize=7),
                     {i: -1e9 for i in range(len(CHARACTERS), qwen_tokenizer.get_vocab_size())},
                     [qwen_content(qwen_images[0]), "Just text.", qwen_content(qwen_images[1]),
                      qwen_content(qwen_images[3])]),
        "mllama": (lambda: Runner(Which.VisionPlain(model_id=mllama, arch=VisionArchitecture.VLlama,
                                                    dtype=ModelDType.F32)),
                   banned_ids(test_mllama.TOKENIZER), [mllama_content(mllama_images[0]), "Hello there.",
                                                       mllama_content(mllama_images[1]),
                                                       mllama_content(mllama_images[2])]),
    }


def request(content, banned) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": content}], model="m", max_tokens=NUM_TOKENS,
                                 temperature=0.0, logit_bias=banned, logprobs=True)


def session(runner: Runner, banned, contents: list) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs of: the first image request, the text request, the two other image requests
    submitted at once (one batch), then the first again (its sequence is new: the earlier ones' state is gone)."""
    engine = runner.llm_engine

    def tokens(response) -> tuple[list[int], list[float]]:
        choice = response.choices[0]
        return (runner.tokenize_text(choice.message.content, add_special_tokens=False),
                [entry.logprob for entry in choice.logprobs.content])

    answers = [tokens(runner.send_chat_completion_request(request(c, banned))) for c in contents[:2]]
    submissions = [engine.submit_chat_completion(request(c, banned)) for c in contents[2:]]
    answers += [tokens(engine.wait(s)) for s in submissions]
    answers.append(tokens(runner.send_chat_completion_request(request(contents[0], banned))))
    runner.close()
    return answers


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "mllama"])
def test_tp2_runner_equals_one_process(families, name, monkeypatch):
    make, banned, contents = families[name]
    want = session(make(), banned, contents)
    assert len({tuple(want[i][0]) for i in (0, 2, 3)}) == 3 and want[4][0] == want[0][0]   # the images matter
    got = session(tp_runner(make, monkeypatch), banned, contents)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, logprobs), (_, expected) in zip(got, want):
        assert logprobs == pytest.approx(expected, abs=1e-4)
    assert rank_children() == []


def image_state(runner: ModelRunner) -> dict[int, tuple[bool, bool]]:
    """seq_id -> (features held, cross-attention state held) of every sequence the runner's image cache records."""
    cache = runner.images
    return {seq_id: (cache.has_features(seq_id), cache.has_cross_attention(seq_id)) for seq_id in cache.seq_ids}


class RecordingPeers(ReplayingPeers):
    """Replays every step on the twin, checks before each step that the two runners hold the same image state, and
    counts, per sequence, the steps whose message carried its image tensors."""

    def __init__(self, head: ModelRunner, twin: ModelRunner) -> None:
        super().__init__(head, twin)
        self.head = head
        self.image_sends: dict[int, int] = {}
        self.states_compared = 0

    def send_step(self, step: StepInputs) -> None:
        assert image_state(self.twin) == image_state(self.head)   # both ran the previous step
        self.states_compared += 1
        for seq_id, record in step.images.new.items():
            if record.images is not None:
                self.image_sends[seq_id] = self.image_sends.get(seq_id, 0) + 1
        super().send_step(step)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "mllama"])
def test_a_replaying_runner_holds_the_heads_image_state(families, name):
    make, banned, contents = families[name]
    runner = make()
    head = runner.llm_engine._engine.model_runner
    peers = RecordingPeers.attached_to(head)
    session(runner, banned, contents)
    assert len(peers.head_logits) == len(peers.twin_logits) > 0
    for got, want in zip(peers.twin_logits, peers.head_logits):
        assert torch.equal(got, want)
    assert sorted(peers.image_sends.values()) == [1, 1, 1, 1]   # four image requests, their tensors sent once each
    assert image_state(peers.twin) == image_state(head)
    assert set(image_state(head)) == {max(peers.image_sends)}   # the finished requests' state is freed
    assert peers.states_compared >= 4 * NUM_TOKENS   # one per step: four rounds of NUM_TOKENS steps at least
