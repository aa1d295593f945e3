"""Alembic's environment for the learner's database: migrations run on the connection the learner
hands in (`selfdistill.learner.database.upgrade`), inside its transaction."""

from alembic import context

from selfdistill.learner.database import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
