import pytest

from tests.qwen_tokenizer_files import write_tokenizer_files


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A directory holding Qwen3's real tokenizer files (tokenizer.json rebuilt from qwen.tiktoken)."""
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    write_tokenizer_files(path)
    return path
