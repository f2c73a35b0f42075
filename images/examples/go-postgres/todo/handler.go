package todo

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
)

// Handler serves the list over HTTP:
// GET /todos lists, POST /todos {"title": ...} adds, POST /todos/<id>/done completes.
func Handler(store *Store) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/todos", func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
			items, err := store.List(r.Context())
			reply(w, http.StatusOK, items, err)
		case http.MethodPost:
			var body struct {
				Title string `json:"title"`
			}
			if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": "expected JSON {\"title\": ...}"})
				return
			}
			item, err := store.Add(r.Context(), body.Title)
			reply(w, http.StatusCreated, item, err)
		default:
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "use GET or POST"})
		}
	})
	mux.HandleFunc("/todos/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/todos/")
		ok := strings.HasSuffix(rest, "/done")
		idText := strings.TrimSuffix(rest, "/done")
		id, err := strconv.ParseInt(idText, 10, 64)
		if !ok || err != nil || r.Method != http.MethodPost {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "expected POST /todos/<id>/done"})
			return
		}
		item, err := store.Complete(r.Context(), id)
		reply(w, http.StatusOK, item, err)
	})
	return mux
}

func reply(w http.ResponseWriter, status int, value any, err error) {
	switch {
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, map[string]string{"error": err.Error()})
	case errors.Is(err, ErrEmptyTitle):
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
	case err != nil:
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
	default:
		writeJSON(w, status, value)
	}
}

func writeJSON(w http.ResponseWriter, status int, value any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(value)
}
