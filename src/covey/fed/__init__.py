"""
Server side: client selection, update validation, aggregation strategies, the in-process engine.
"""
