"""Database: tables (`models`), engine and sessions (`session`), migrations, job transitions."""
