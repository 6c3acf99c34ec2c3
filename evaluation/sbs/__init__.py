"""Side-by-side evaluation (report §8.2): plans, judgments, scores, reports."""
