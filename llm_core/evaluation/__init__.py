"""model_evaluation: validation scores per document, multiple-choice tasks, and the promotion verdict
against the champion."""
