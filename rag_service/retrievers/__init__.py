"""First-stage retrievers over an index's arrays: analysis (tokens), BM25 (lexical), dense."""
