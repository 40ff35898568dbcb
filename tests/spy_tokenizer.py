"""A tokenizer that records how long each text it encodes is: to check that long texts go in bounded pieces."""


class EncodeSpy:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encoded_chars: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.encoded_chars.append(len(text))
        return self.tokenizer.encode(text)

    def __getattr__(self, name):  # everything else is the tokenizer's own
        return getattr(self.tokenizer, name)
