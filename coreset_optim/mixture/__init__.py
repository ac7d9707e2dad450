"""The data mixture: which source each example comes from (:mod:`.sources`), how the budget is
shared among sources (:mod:`.budget`), and choosing each source's share with the method
(:mod:`.choose`)."""
