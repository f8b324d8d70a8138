"""Data ingestion: read rows from files, render prompt/target templates, tokenise with target masks."""
