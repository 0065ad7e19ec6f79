"""Models: NNX layers (`layers`), the two language models with their decoding states
(`model`), and the packed ternary inference form of the MatMul-free LM (`packed`)."""
