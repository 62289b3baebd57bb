"""
Server side: client selection, update validation, aggregation strategies, the in-process engine,
the round loop and the experiment trackers it reports each round to (`tracking`).
"""
