-- The owner's fencing token. A projector that takes a projection's lease
-- claims the checkpoint row by raising its epoch, and moves the checkpoint
-- only while the row still carries its epoch and the sequence it last saw:
-- a former owner that has not yet noticed it lost the lease fails to commit
-- instead of applying a batch the new owner applies too.
ALTER TABLE projector_checkpoint ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
