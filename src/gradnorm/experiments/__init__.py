"""Worked problems on top of the hook layer: the paper's toy regression (section 4), the Palmer penguins,
a dense encoder-decoder, and the demo, method comparison and section 5.3 sweep built on them."""
