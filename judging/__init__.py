"""LLM-as-judge win rates, the parts behind compare.py: `engine` sends chat requests to OpenAI-compatible endpoints
(concurrent, paced, retried; usable as a library), `cache` keeps every transcript keyed by its request, `protocol`
holds the judge prompts and verdict parsing, `judgments` plans and collects a comparison's requests,
`sample_formats` reads and writes sample files, `lengths` measures responses, `stats` and `summary` turn verdicts into
win rates with intervals, `outputs` writes results lines, CSV and charts."""
