# Cloud image: ingest, Celery worker and beat, CLI. Build: docker build -t edgeloop-cloud .
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md alembic.ini ./
COPY cloud cloud
COPY edge_agent edge_agent
COPY shared shared
COPY sim sim
COPY migrations migrations
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[cloud]"
# Its own user, owning the folders compose's named volumes mount (a new volume takes the
# owner of the folder it covers): online TUF keys, enrollments, packages, the sensor feed.
RUN useradd --uid 1000 --create-home edgeloop \
 && install -d -o edgeloop -m 700 /keys \
 && install -d -o edgeloop /enroll /models /feed
USER edgeloop
ENTRYPOINT ["edgeloop"]
